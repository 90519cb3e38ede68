"""Handlers for the load benchmarks (importable as ``handlers`` with bench/load on PYTHONPATH)."""


def noop(message: object) -> None:
    """An empty handler: the benchmark measures gwcore, not the work."""
