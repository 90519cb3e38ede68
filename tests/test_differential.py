"""Differential tests: random requests, encodings and envelopes through the extension and through
tests/reference_impl.py; the two must agree exactly (status and reason of a rejection; id, key,
headers in order, body, expiry and framed bytes of an envelope)."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gwcore import _dedup
from gwcore.errors import FramingError

import reference_impl as ref

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

URL_SAFE = set((string.ascii_letters + string.digits + "-_.!*()").encode())

# text that looks like header material: ASCII-heavy, with some non-ASCII and the characters that
# encoding has to care about
header_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(string.ascii_letters + string.digits + " .-_:/,=+%~&$@"),
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
    ),
    max_size=24,
)


@st.composite
def url_encoded(draw, text: str, noise: bool = True) -> bytes:
    """*text* URL-encoded the way some sender might: safe bytes literal or escaped, either hex
    case, space as '+' or %20, non-ASCII raw or escaped; with *noise* now and then a stray '%'."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        way = draw(st.integers(0, 5))
        if byte == 0x20 and way < 4:
            out += b"+"
        elif (byte in URL_SAFE or (byte >= 0x80 and way == 1)) and way < 4:
            out.append(byte)
        else:
            escaped = b"%%%02X" % byte
            out += escaped.lower() if way == 5 else escaped
    if noise and draw(st.integers(0, 20)) == 7:  # not 0: hypothesis favours boundary values
        out.insert(draw(st.integers(0, len(out))), ord("%"))
    return bytes(out)


@st.composite
def random_case(draw, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.swapcase() if flip else c for c, flip in zip(name, flips))


timespan_text = st.one_of(
    st.builds(
        lambda ws1, neg, numbers, seps, ws2: ws1 + neg + "".join(n + s for n, s in zip(numbers, seps + [""])) + ws2,
        st.sampled_from(["", " ", "\t"]),
        st.sampled_from(["", "", "-"]),
        st.lists(st.from_regex(r"[0-9]{1,9}", fullmatch=True), min_size=1, max_size=6),
        st.lists(st.sampled_from([".", ":", ":", ":"]), min_size=5, max_size=5),
        st.sampled_from(["", " ", "x"]),
    ).map(lambda s: s),
    st.text(alphabet="0123456789.:- \t", max_size=30),
    st.sampled_from(["10675199.02:48:05.4775807", "-10675199.02:48:05.4775808", "00:00:00.5", "1.00:00:00"]),
)

CALL_TYPES = [
    "SingleCallSubmit", "0", " SingleCallSubmit\t", "SingleCallDatabusProperty", "1", "Submit", "Ack",
    "", "singlecallsubmit", "2", "\u3000SingleCallSubmit",
]


MUTATIONS = [None] * 8 + [
    "drop-id", "odd-id", "drop-call-type", "odd-call-type", "bad-md5", "databus-part", "repeat", "drop-correlation-id",
]


@st.composite
def gateway_request(draw):
    """A valid request (gateway or custom) with at most one thing wrong with it."""
    body = draw(st.binary(max_size=64))
    mutation = draw(st.sampled_from(MUTATIONS))
    control = {
        "NServiceBus.Id": draw(st.from_regex(r"[0-9a-f]{8}-[0-9a-f]{4}", fullmatch=True)),
        "NServiceBus.CallType": draw(st.sampled_from(["SingleCallSubmit", "0", " SingleCallSubmit\t"])),
        "NServiceBus.CorrelationId": draw(header_text),
    }
    if draw(st.booleans()):
        control["Content-MD5"] = ref.content_md5(body)
    if draw(st.booleans()):
        control["NServiceBus.Gateway"] = draw(st.sampled_from(["True", "", "false"]))
    if draw(st.booleans()):
        control["NServiceBus.TimeToBeReceived"] = draw(st.one_of(timespan_text, header_text))
    if draw(st.booleans()):
        # request signing: the framer keeps these only when made with signatures=True
        control["gwcore-Date"] = draw(st.sampled_from(["20261126T171029Z", ""]))
        if draw(st.booleans()):
            control["gwcore-Signature"] = draw(st.one_of(st.just("v1.hq." + "A" * 43), st.just("v2.hq." + "A" * 43),
                                                         header_text))
        if draw(st.booleans()):
            control["Content-Digest"] = draw(st.one_of(st.just("sha-256=:" + "A" * 43 + "=:"), header_text))
    if mutation and mutation.startswith("drop-"):
        del control[{"drop-id": "NServiceBus.Id", "drop-call-type": "NServiceBus.CallType",
                     "drop-correlation-id": "NServiceBus.CorrelationId"}[mutation]]
    elif mutation == "odd-id":
        control["NServiceBus.Id"] = draw(st.one_of(header_text, st.sampled_from(["", "   ", "\xa0"]), st.text(min_size=380, max_size=420)))
    elif mutation == "odd-call-type":
        control["NServiceBus.CallType"] = draw(st.one_of(st.sampled_from(CALL_TYPES), header_text))
    elif mutation == "bad-md5":
        control["Content-MD5"] = draw(st.sampled_from([ref.content_md5(body + b"!"), "", ref.content_md5(body).lower()]))
    pairs = [(draw(random_case(name)), value) for name, value in control.items()]

    prefix = st.sampled_from(["NServiceBus.Header.", "nservicebus.header.", "NServiceBus.Header.NServiceBus.Header.", "NSERVICEBUS.HEADER.", "X-", ""])
    known = st.sampled_from(["NServiceBus.MessageId", "NServiceBus.DataBusConfig.ContentType", "NServiceBus.ReplyToAddress"])
    for _ in range(draw(st.integers(0, 8))):
        name = draw(prefix) + draw(st.one_of(header_text, header_text, header_text, known))
        if ref.ascii_fold(name) not in {ref.ascii_fold(seen) for seen, _ in pairs}:
            pairs.append((name, draw(header_text)))
    if mutation == "databus-part":
        pairs.append((draw(prefix) + draw(random_case("NServiceBus.DataBus.")) + draw(header_text), "k"))
    elif mutation == "repeat":
        name, _ = draw(st.sampled_from(pairs))
        pairs.append((draw(random_case(name)), draw(header_text)))
    pairs = draw(st.permutations(pairs))
    flat = []
    for name, value in pairs:
        raw_name, raw_value = draw(url_encoded(name, noise=False)), draw(url_encoded(value))
        wrap = draw(st.sampled_from([bytes, bytes, bytearray, memoryview]))
        flat += [wrap(raw_name), wrap(raw_value)]

    query = None
    if draw(st.booleans()):
        params = []
        for _ in range(draw(st.integers(0, 4))):
            key = draw(random_case(draw(st.sampled_from(["NServiceBus.Id", "NServiceBus.CallType", "Content-MD5", "Message", "callback", "NServiceBus.Gateway", "gwcore-Signature", "X"]))))
            value = draw(header_text)
            once = draw(url_encoded(value))
            # usually double-encoded (what survives both decodes), sometimes only once
            raw_value = draw(url_encoded(once.decode("utf-8", "replace"))) if draw(st.booleans()) else once
            params.append(draw(url_encoded(key)) + (b"=" + raw_value if draw(st.integers(0, 5)) else b""))
        query = b"&".join(params)

    framer_args = {"max_id_bytes": draw(st.sampled_from([400] * 8 + [13, 8])), "parse_query": draw(st.booleans()),
                   "signatures": draw(st.booleans())}
    body_arg = draw(st.sampled_from([bytes, bytearray, lambda b: memoryview(b"pad" + b)[3:]]))(body)
    return flat, body_arg, query, draw(st.integers(0, 2**64 - 1)), framer_args


def outcome(result):
    if type(result).__name__ == "Rejection":
        return ("rejected", result.status, result.reason, result.callback, result.id, result.body,
                result.auth_date, result.auth_signature, result.method, result.target,
                result.auth_headers, result.content_digest)
    return (
        "accepted", result.id, result.key, result.call_type, result.expiry_ms, result.accepted_ms,
        list(result.headers.items()), result.body, result.framed, result.callback,
        result.auth_date, result.auth_signature, result.method, result.target, result.auth_headers,
        result.databus_key, result.content_md5, result.content_digest, result.databus,
    )


@SETTINGS
@given(gateway_request(), st.sampled_from(["RemoteSite", "Zürich", ""]))
def test_frame_agrees(request, scope):
    flat, body, query, now_ms, framer_args = request
    ext, oracle = _dedup.Framer(scope, **framer_args), ref.Framer(scope, **framer_args)
    got, want = ext.frame(flat, body, query, now_ms), oracle.frame(flat, body, query, now_ms)
    assert outcome(got) == outcome(want)
    # `pytest --hypothesis-show-statistics` shows that every outcome is reached
    event(f"rejected {got.status} {got.reason[:30]}" if outcome(got)[0] == "rejected" else f"accepted, expiry={bool(got.expiry_ms)}")
    assert (ext.framed_total, ext.rejected_total) == (oracle.framed_total, oracle.rejected_total)
    if outcome(got)[0] == "accepted":
        assert _dedup.decode_envelope(got.framed) == (got.id, got.headers, got.body, got.expiry_ms, got.accepted_ms)


@SETTINGS
@given(st.one_of(st.binary(max_size=64), header_text.flatmap(url_encoded)))
def test_url_decode_agrees(raw):
    assert _dedup.url_decode(raw) == ref.url_decode(raw)


@SETTINGS
@given(st.text(max_size=40))
def test_url_encode_agrees_and_round_trips(text):
    encoded = _dedup.url_encode(text)
    assert encoded == ref.url_encode(text)
    assert _dedup.url_decode(encoded.encode("ascii")) == text


@SETTINGS
@given(st.one_of(timespan_text, st.text(max_size=12)))
def test_parse_timespan_agrees(text):
    assert _dedup.parse_timespan(text) == ref.parse_timespan(text)


envelope_args = st.tuples(
    st.text(max_size=20),
    st.one_of(
        st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=6),
        st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=6),
    ),
    st.binary(max_size=64),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)


@SETTINGS
@given(envelope_args)
def test_envelope_agrees_and_round_trips(args):
    framed = _dedup.encode_envelope(*args)
    assert framed == ref.encode_envelope(*args)
    id, headers, body, expiry_ms, accepted_ms = args
    assert _dedup.decode_envelope(framed) == (id, dict(headers), body, expiry_ms, accepted_ms)


def _decode_outcome(impl, data):
    try:
        return impl.decode_envelope(data)
    except FramingError:
        return FramingError


@SETTINGS
@given(envelope_args, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4), st.integers(0, 10**6), st.binary(max_size=40))
def test_decode_envelope_agrees_on_damaged_input(args, flips, cut, garbage):
    framed = bytearray(_dedup.encode_envelope(*args))
    for at, byte in flips:
        framed[at % len(framed)] = byte
    for data in (bytes(framed), bytes(framed[: cut % (len(framed) + 1)]), garbage, b"GW\x01" + garbage):
        assert _decode_outcome(_dedup, data) == _decode_outcome(ref, data)
