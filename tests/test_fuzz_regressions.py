"""The fuzz corpus as a regression suite: every file of tests/fuzz_corpus/<target>/ (the seeds) and
of tests/fuzz_crashes/<target>/ (inputs the fuzzer once failed on) goes through the target's own
``check(data)`` (fuzz/fuzz_<target>.py) on the build in place, without atheris. A crash found by
``make fuzz`` is added by copying its file to tests/fuzz_crashes/<target>/ (docs/development.md,
"Fuzzing"). Below them, what those findings were, as plain tests."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from gwcore import _dedup
from gwcore.errors import FramingError

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in (ROOT / "fuzz").glob("fuzz_*.py"))
NOW = 1_787_000_000_000


def _target(name: str):
    module = sys.modules.get(f"fuzz_{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"fuzz_{name}", ROOT / "fuzz" / f"fuzz_{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _cases() -> list:
    cases = []
    for folder in ("fuzz_corpus", "fuzz_crashes"):
        for target_dir in sorted((ROOT / "tests" / folder).glob("*")):
            if target_dir.is_dir():
                cases += [pytest.param(target_dir.name, path, id=f"{folder}/{target_dir.name}/{path.name}")
                          for path in sorted(target_dir.iterdir()) if path.is_file()]
    return cases


def test_every_target_has_seeds_and_every_folder_a_target():
    assert TARGETS == ["batch", "envelope", "framer", "request_parser"]
    for target in TARGETS:
        assert list((ROOT / "tests" / "fuzz_corpus" / target).iterdir()), target
    for folder in ("fuzz_corpus", "fuzz_crashes"):
        for target_dir in (ROOT / "tests" / folder).glob("*"):
            assert target_dir.name in TARGETS, f"tests/{folder}/{target_dir.name} has no fuzz/fuzz_{target_dir.name}.py"


@pytest.mark.parametrize("target,path", _cases())
def test_replay(target, path):
    _target(target).check(path.read_bytes())


def test_check_refuses_what_it_should():
    # the targets' checks are not vacuous: a broken invariant is reported
    rp = _target("request_parser")
    with pytest.raises(rp.Finding):
        rp.Checker(0).feed([(_dedup.EV_ERROR, 400, "x"), (_dedup.EV_CONTINUE,)], rp.make(0))
    with pytest.raises(rp.Finding):
        rp.expect(rp.norm([(_dedup.EV_ERROR, 400, "a")]) == rp.norm([(_dedup.EV_ERROR, 431, "a")]), "differ")
    env = _target("envelope")
    assert env.layout_ok(_dedup.encode_envelope("i", [("a", "b")], b"c", 1, 2))
    assert not env.layout_ok(_dedup.encode_envelope("i", [("a", "b")], b"c", 1, 2)[:-1])
    batch = _target("batch")
    block = b"NServiceBus.Id: a\r\nNServiceBus.CallType: SingleCallSubmit\r\n"
    with pytest.raises(batch.Finding):    # an outcome other than the message framed alone
        batch.check_message(_dedup.Framer("Ep").frame_batch(_dedup.encode_batch([(block, b"x")]), 1, 1,
                                                            max_headers=9, max_header_bytes=999)[0],
                            block, b"another body", (9, 999))
    with pytest.raises(batch.Finding):    # a 431 where the block is within the bounds
        batch.check_message(_dedup.Framer("Ep").frame_batch(_dedup.encode_batch([(block, b"")]), 1, 1,
                                                            max_headers=1, max_header_bytes=999)[0],
                            block, b"", (9, 999))


# -- what the fuzzer found ------------------------------------------------------------------------

def _parser(**limits):
    settings = dict(max_headers=100, max_header_bytes=64, max_body=1 << 20)
    settings.update(limits)
    return _dedup.RequestParser(_dedup.Framer("RemoteSite"), [b"/remotesite/"], allow_get=False, **settings)


def _statuses(data: bytes, cuts: list[int], **limits) -> list:
    parser = _parser(**limits)
    bounds = [0, *cuts, len(data)]
    return [ev[:2] for a, b in zip(bounds, bounds[1:]) for ev in parser.feed(data[a:b], NOW)]


@pytest.mark.parametrize("data", [
    b"\xff" * 60 + b"GET / HTTP/1.1\r\n\r\n",                                    # a bad method
    b"GET / HTTP/1.1\r\nX: a\rb" + b"c" * 60 + b"\r\n\r\n",                    # a bare CR
    b"GET / HTTP/1.1\r\nX" + b"a" * 30 + b" b: c" + b"c" * 40 + b"\r\n\r\n",   # a bad name
])
def test_a_long_malformed_head_is_400_however_it_is_cut(data):
    # tests/fuzz_crashes/request_parser/error-status-by-cut-431-or-400: the line was refused 431
    # when it came in one read (its length was checked first) and 400 when cut (its start was)
    assert {tuple(_statuses(data, cuts)) for cuts in ([], [5], [20], [40], list(range(1, len(data))))} == {
        ((_dedup.EV_ERROR, 400),)}


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 80 + b"\x01\r\n\r\n",   # malformed past the bound
    b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 80 + b"\n\r\n",         # a bare LF past the bound
])
def test_a_head_too_long_before_it_is_malformed_is_431_however_it_is_cut(data):
    assert {tuple(_statuses(data, cuts)) for cuts in ([], [5], [40], [90], list(range(1, len(data))))} == {
        ((_dedup.EV_ERROR, 431),)}


def test_a_chunk_size_line_past_the_bound_is_400_however_it_is_cut():
    # accepted when the line came in one read, 400 "chunk size line too long" when cut
    data = (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"a" * 300
            + b"\r\nhello\r\n0\r\n\r\n")
    for cuts in ([], [100], [300]):
        assert _statuses(data, cuts, max_header_bytes=200) == [(_dedup.EV_ERROR, 400)], cuts
    fits = data.replace(b"a" * 300, b"a" * 150)
    assert _statuses(fits, [], max_header_bytes=200) == [(_dedup.EV_OTHER, True)]


def test_encode_submit_refuses_a_header_count_the_envelope_cannot_hold():
    # tests/fuzz_crashes/envelope/encode-submit-header-count-allocation: the count sized two
    # arrays before any header was read (13 GB asked for by a 97-byte envelope)
    framed = bytearray(_dedup.encode_envelope("id", [("a", "b")], b"", 0, 0))
    framed[25:29] = (0xFFFFFFFF).to_bytes(4, "big")
    with pytest.raises(FramingError, match="4294967295 headers need at least"):
        _dedup.encode_submit(bytes(framed))


def test_encode_submit_refuses_an_id_that_is_not_utf8_with_framing_error():
    # tests/fuzz_crashes/envelope/encode-submit-invalid-utf8-id: UnicodeDecodeError escaped
    framed = _dedup.encode_envelope("\xe9", [], b"", 0, 0).replace("\xe9".encode(), b"\xe9\x00")
    with pytest.raises(FramingError, match="invalid UTF-8 in the id"):
        _dedup.encode_submit(framed)
    with pytest.raises(FramingError):
        _dedup.decode_envelope(framed)
