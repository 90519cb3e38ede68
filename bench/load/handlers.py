"""Handlers for the load benchmarks (importable as ``handlers`` with bench/load on PYTHONPATH)."""


def noop(message: object) -> None:
    """An empty handler: the benchmark measures gwcore, not the work."""


async def async_noop(message: object) -> None:
    """An empty async handler: run on the loop, so no thread pool hand-off (a sync handler, which
    may block, runs in a thread) is measured either."""
