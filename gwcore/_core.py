"""Import of the compiled core. There is deliberately no pure-Python fallback: gwcore's guarantees
and speed come from gwcore._dedup, and running without it silently would hide both."""

from .errors import ExtensionMissingError

try:
    from . import _dedup as core
except ImportError as exc:  # pragma: no cover - exercised by tests/test_packaging.py in a subprocess
    raise ExtensionMissingError(
        "gwcore's compiled core (gwcore._dedup) is not importable: "
        f"{exc}. Build it with `make compile` (or `pip install -e .` / "
        "`python setup.py build_ext --inplace` with Cython and a C compiler installed). "
        "gwcore has no pure-Python fallback."
    ) from exc

__all__ = ("core",)
