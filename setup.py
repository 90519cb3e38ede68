"""Build of the gwcore Cython core (gwcore._dedup).

Only build flags are read from the environment here; runtime settings live in gwcore/config.py.

* GWCORE_DEBUG=1         debug build: bounds checks, line tracing, -O0 -g, GWCORE_DEBUG macro
* GWCORE_ANNOTATE=1      write the Cython HTML annotation next to the source
* GWCORE_CYTHON_ALWAYS=1 re-cythonize even when the .c file looks current
"""

import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

HERE = pathlib.Path(__file__).parent
MODE_FILE = HERE / "build" / "gwcore-mode"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


class build_ext(_build_ext):
    def finalize_options(self) -> None:
        # cythonize here, not at import time: pip queries setup.py more than once per install.
        if getattr(self, "_gwcore_cythonized", False):
            return super().finalize_options()
        from Cython.Build import cythonize

        debug = _flag("GWCORE_DEBUG")
        mode = "debug" if debug else "release"
        # A debug build must never reuse a release .c (and the reverse): force when the mode changes.
        previous = MODE_FILE.read_text() if MODE_FILE.exists() else ""
        force = _flag("GWCORE_CYTHON_ALWAYS") or previous != mode
        directives = {
            "language_level": 3,
            "embedsignature": True,
            "auto_pickle": False,
            "autotestdict": False,
            "boundscheck": debug,
            "wraparound": debug,
            "cdivision": not debug,
        }
        if debug:
            directives["linetrace"] = True
            for ext in self.distribution.ext_modules:
                ext.define_macros = [("GWCORE_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")]
                ext.extra_compile_args = ["-O0", "-g", "-UNDEBUG"]
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=_flag("GWCORE_ANNOTATE"),
            force=force,
        )
        MODE_FILE.parent.mkdir(exist_ok=True)
        MODE_FILE.write_text(mode)
        self._gwcore_cythonized = True
        super().finalize_options()


setup(
    ext_modules=[
        Extension(
            "gwcore._dedup",
            ["gwcore/_dedup.pyx"],
            include_dirs=["gwcore/includes"],
            extra_compile_args=["-O2"],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
