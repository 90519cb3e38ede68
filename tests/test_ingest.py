"""The ingest sink protocol (gwcore/ingest.py): the local writer and selected mode's dispatcher
are both what the listeners and the databus part intake call."""

from __future__ import annotations

import inspect

from gwcore.ingest import IngestSink
from gwcore.selected import Selected
from gwcore.selected.dispatcher import Dispatcher
from gwcore.store import Writer

# what gwcore/http.py, gwcore/batch.py, the compiled ListenerCore and gwcore/databus/intake.py use
MEMBERS = ("store", "pending", "ingest_then", "call", "blob_expiry_ms", "doom")
METHODS = ("ingest_then", "call", "blob_expiry_ms", "doom")


def test_the_writer_and_the_selected_dispatcher_are_ingest_sinks(run, gateway_factory):
    async def main():
        async with gateway_factory() as gw:
            sel = Selected(gw)  # not started: no broker needed
            for sink in (gw.writer, sel.dispatcher):
                assert isinstance(sink, IngestSink)
                assert [m for m in MEMBERS if not hasattr(sink, m)] == []
                assert sink.store is gw.store and sink.pending == 0
            assert sel.dispatcher.writer is gw.writer  # the dispatcher wraps the writer, it is not one
            assert not isinstance(sel, IngestSink) and not isinstance(sel.dispatcher, Writer)

    run(main())


def test_the_two_sinks_take_the_same_arguments():
    for name in METHODS:
        expected = list(inspect.signature(getattr(IngestSink, name)).parameters)
        assert list(inspect.signature(getattr(Writer, name)).parameters) == expected, name
        assert list(inspect.signature(getattr(Dispatcher, name)).parameters) == expected, name


def test_something_without_the_whole_interface_is_no_sink():
    class Partial:
        store = None
        pending = 0

        def ingest_then(self, envelope, done):
            pass

    assert not isinstance(Partial(), IngestSink)
