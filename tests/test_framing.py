"""Framing behaviour of gwcore._dedup against protocol.md: every vector of §8, the receiver rules of
§1.2/§1.6/§1.7 and gwcore's deliberate differences, the envelope codec. Each behaviour runs against
the extension and against tests/reference_impl.py."""

from __future__ import annotations

import random

import urllib.parse

import pytest

from gwcore import _dedup
from gwcore.errors import ConfigurationError, FramingError, InternalError

import reference_impl

NOW = 1_787_000_000_000
MSG_ID = "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"
BODY = b'{"Hello":"World"}'


@pytest.fixture(params=[_dedup, reference_impl], ids=["extension", "reference"])
def impl(request):
    return request.param


# protocol.md §8.1, header for header as on the wire (already URL-encoded by the sender)
PLAIN_SUBMIT = [
    ("Host", "localhost:25900"),
    ("NServiceBus.Id", MSG_ID),
    ("NServiceBus.CorrelationId", MSG_ID),
    ("NServiceBus.ReplyToAddress", "Headquarters"),
    ("NServiceBus.Header.NServiceBus.MessageId", MSG_ID),
    ("NServiceBus.Header.NServiceBus.MessageIntent", "Send"),
    ("NServiceBus.Header.NServiceBus.ConversationId", "5c0e9a47-3a5e-4d0c-9a1c-b3a400c1d2e3"),
    ("NServiceBus.Header.NServiceBus.CorrelationId", MSG_ID),
    ("NServiceBus.Header.NServiceBus.ReplyToAddress", "Headquarters"),
    ("NServiceBus.Header.NServiceBus.OriginatingEndpoint", "Headquarters"),
    ("NServiceBus.Header.NServiceBus.OriginatingMachine", "HQ-SRV01"),
    ("NServiceBus.Header.NServiceBus.ContentType", "application%2Fjson"),
    (
        "NServiceBus.Header.NServiceBus.EnclosedMessageTypes",
        "Shared.UpdatePrice%2C+Shared%2C+Version%3D1.0.0.0%2C+Culture%3Dneutral%2C+PublicKeyToken%3Dnull",
    ),
    ("NServiceBus.Header.NServiceBus.Version", "10.2.8"),
    ("NServiceBus.Header.NServiceBus.TimeSent", "2026-08-20+10%3A15%3A30%3A123456+Z"),
    ("NServiceBus.Header.NServiceBus.DestinationSites", "RemoteSite"),
    ("NServiceBus.Header.NServiceBus.OriginatingSite", "http%2Chttp%3A%2F%2Flocalhost%3A25899%2FHeadquarters%2F"),
    ("NServiceBus.Gateway", "True"),
    ("NServiceBus.CallType", "SingleCallSubmit"),
    ("Content-Type", "application/x-www-form-urlencoded"),
    ("Content-MD5", "0S9RmNGZjrrjq41F3ZZBjw%3D%3D"),
    ("Content-Length", "17"),
]

PLAIN_SUBMIT_MESSAGE_HEADERS = {
    "NServiceBus.MessageId": MSG_ID,
    "NServiceBus.MessageIntent": "Send",
    "NServiceBus.ConversationId": "5c0e9a47-3a5e-4d0c-9a1c-b3a400c1d2e3",
    "NServiceBus.CorrelationId": MSG_ID,
    "NServiceBus.ReplyToAddress": "Headquarters",
    "NServiceBus.OriginatingEndpoint": "Headquarters",
    "NServiceBus.OriginatingMachine": "HQ-SRV01",
    "NServiceBus.ContentType": "application/json",
    "NServiceBus.EnclosedMessageTypes": "Shared.UpdatePrice, Shared, Version=1.0.0.0, Culture=neutral, PublicKeyToken=null",
    "NServiceBus.Version": "10.2.8",
    "NServiceBus.TimeSent": "2026-08-20 10:15:30:123456 Z",
    "NServiceBus.DestinationSites": "RemoteSite",
    "NServiceBus.OriginatingSite": "http,http://localhost:25899/Headquarters/",
}


def wire(pairs) -> list[bytes]:
    """httptools' view: a flat list of raw name/value bytes."""
    flat: list[bytes] = []
    for name, value in pairs:
        flat += [name.encode("utf-8"), value.encode("utf-8")]
    return flat


def edit(pairs, replace=None, drop=()):
    """A copy of *pairs* without the names in *drop*, with the values in *replace* replaced or added."""
    replace = dict(replace or {})
    out = [(n, replace.pop(n, v)) for n, v in pairs if n not in drop]
    return out + list(replace.items())


def frame(impl, pairs, body=BODY, query=None, now=NOW, **framer_args):
    return impl.Framer("RemoteSite", **framer_args).frame(wire(pairs), body, query, now)


def assert_rejected(result, status, reason):
    assert type(result).__name__ == "Rejection", result
    assert (result.status, result.reason) == (status, reason)


# ---- §8 hash table -------------------------------------------------------------------------

HASH_VECTORS = [
    (b'{"Hello":"World"}', "0S9RmNGZjrrjq41F3ZZBjw==", "0S9RmNGZjrrjq41F3ZZBjw%3D%3D", "0S9RmNGZjrrjq41F3ZZBjw%3d%3d"),
    (b"myData", "4HJGsZlkhfKtZTbdlkaTgw==", "4HJGsZlkhfKtZTbdlkaTgw%3D%3D", "4HJGsZlkhfKtZTbdlkaTgw%3d%3d"),
    (b"", "1B2M2Y8AsgTpgAmY7PhCfg==", "1B2M2Y8AsgTpgAmY7PhCfg%3D%3D", "1B2M2Y8AsgTpgAmY7PhCfg%3d%3d"),
    (b'"AAECAw=="', "Nbvu6YGnTj+9Hqh2OyA2jw==", "Nbvu6YGnTj%2B9Hqh2OyA2jw%3D%3D", "Nbvu6YGnTj%2b9Hqh2OyA2jw%3d%3d"),
    (b'<?xml version="1.0" ?>', "Zpcwedx/3A7tu8vtG/C94A==", "Zpcwedx%2F3A7tu8vtG%2FC94A%3D%3D", "Zpcwedx%2f3A7tu8vtG%2fC94A%3d%3d"),
]


@pytest.mark.parametrize(("body", "md5", "upper", "lower"), HASH_VECTORS)
def test_hash_vectors(impl, body, md5, upper, lower):
    assert impl.content_md5(body) == md5
    assert impl.content_md5(bytearray(body)) == md5
    assert impl.url_encode(md5) == upper
    assert impl.url_decode(upper.encode()) == md5
    assert impl.url_decode(lower.encode()) == md5


@pytest.mark.parametrize(("body", "md5", "upper", "lower"), HASH_VECTORS)
def test_hash_vectors_verify_on_submit_in_either_hex_case(impl, body, md5, upper, lower):
    for encoded in (upper, lower):
        result = frame(impl, edit(PLAIN_SUBMIT, {"Content-MD5": encoded}), body=body)
        assert result.body == body


# ---- §8 "Other encoded values" ------------------------------------------------------------

ENCODED_VALUES = [
    ("http,http://localhost:25899/Headquarters/", "http%2Chttp%3A%2F%2Flocalhost%3A25899%2FHeadquarters%2F"),
    ("2026-08-20 10:15:30:123456 Z", "2026-08-20+10%3A15%3A30%3A123456+Z"),
    (
        "Shared.UpdatePrice, Shared, Version=1.0.0.0, Culture=neutral, PublicKeyToken=null",
        "Shared.UpdatePrice%2C+Shared%2C+Version%3D1.0.0.0%2C+Culture%3Dneutral%2C+PublicKeyToken%3Dnull",
    ),
    ("Headquarters@HQ-SRV01", "Headquarters%40HQ-SRV01"),
    ("00:10:00", "00%3A10%3A00"),
    ("NServiceBus.Header.$.diagnostics.hostid", "NServiceBus.Header.%24.diagnostics.hostid"),
    ("a b~c", "a+b%7Ec"),
    ("Zürich", "Z%C3%BCrich"),
    ("", ""),
    ("AZaz09-_.!*()", "AZaz09-_.!*()"),
]


@pytest.mark.parametrize(("text", "encoded"), ENCODED_VALUES)
def test_encoded_values(impl, text, encoded):
    assert impl.url_encode(text) == encoded
    assert impl.url_decode(encoded.encode()) == text
    assert impl.url_decode(encoded.lower().encode()).lower() == text.lower()


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"a+b", "a b"),
        (b"%2B", "+"),
        (b"%2b", "+"),
        (b"%3d%3D", "=="),
        (b"100%", "100%"),
        (b"%4", "%4"),
        (b"%zz%4g", "%zz%4g"),
        (b"%%41", "%A"),
        (b"%u0041", "%u0041"),  # no %uXXXX in WebUtility
        (b"Z\xc3\xbcrich", "Zürich"),  # raw UTF-8 passes through
        (b"%C3%BC\xc3\xbc", "üü"),
        (b"%C3", "\ufffd"),
        (b"\xff+x", "\ufffd x"),
        (b"", ""),
    ],
)
def test_url_decode_edges(impl, raw, text):
    assert impl.url_decode(raw) == text
    assert impl.url_decode(bytearray(raw)) == text
    assert impl.url_decode(memoryview(b"__" + raw)[2:]) == text


def test_url_encode_lone_surrogate_like_dotnet(impl):
    assert impl.url_encode("a\ud800b") == "a%EF%BF%BDb"
    assert impl.url_encode("\ud83d\ude00") == impl.url_encode("\U0001f600") == "%F0%9F%98%80"


# ---- TimeSpan --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("00:00:10", 10_000),
        ("1.00:00:00", 86_400_000),
        ("00:10:00", 600_000),
        ("7", 7 * 86_400_000),
        ("10:30", 37_800_000),
        ("1.02:03", 93_780_000),
        ("1.02:03:04", 93_784_000),
        ("1:02:03:04", 93_784_000),
        ("1:02:03:04.5", 93_784_500),
        ("00:00:00.5", 500),
        ("00:00:00.0009999", 0),
        ("00:00:01.1234567", 1123),
        (" \t00:00:05 ", 5000),
        ("-00:00:05", -5000),
        ("-00:00:00.0005", 0),
        ("10675199.02:48:05.4775807", 922_337_203_685_477),
        ("-10675199.02:48:05.4775808", -922_337_203_685_477),
        ("10675199", 10675199 * 86_400_000),
        ("23:59:59", 86_399_000),
        ("0001:02", 3_720_000),
    ],
)
def test_parse_timespan_accepts(impl, text, ms):
    assert impl.parse_timespan(text) == ms


@pytest.mark.parametrize(
    "text",
    [
        "", " ", "-", "abc", "24:00", "00:60", "00:00:60", "00:00:00.12345678", "10675199.02:48:05.4775808",
        "10675200", "1.2", "1:2:3:4:5", "00:00.5", "1.00:00.5", ":10", "10:", "1..2:3", "+00:00:01",
        "- 00:00:01", "00:00:01x", "１:00", "\u200300:00:01",
    ],
)
def test_parse_timespan_rejects(impl, text):
    assert impl.parse_timespan(text) is None


# ---- sequence numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("seq", [0, 1, 255, 256, 2**32, 2**64 - 1])
def test_pack_seq_round_trip_and_order(impl, seq):
    packed = impl.pack_seq(seq)
    assert len(packed) == 8 and packed == seq.to_bytes(8, "big")
    assert impl.unpack_seq(packed) == impl.unpack_seq(bytearray(packed)) == seq


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"\x00" * 9])
def test_unpack_seq_wrong_size(impl, data):
    with pytest.raises(FramingError):
        impl.unpack_seq(data)


def test_pack_seq_range():
    with pytest.raises(OverflowError):
        _dedup.pack_seq(-1)
    with pytest.raises(OverflowError):
        _dedup.pack_seq(2**64)


# ---- envelope codec --------------------------------------------------------------------------

ENVELOPE_ARGS = ("id-ü", [("A", "1"), ("Zürich", "grüezi"), ("", "")], b"\x00body\xff", 123, 2**64 - 1)


def test_envelope_layout(impl):
    framed = impl.encode_envelope("i", {"n": "v"}, b"bo", 7, 9)
    assert framed == (
        b"GW\x01" + (9).to_bytes(8, "big") + (7).to_bytes(8, "big") + b"\x00\x00\x00\x01i" + b"\x00\x00\x00\x01"
        + b"\x00\x00\x00\x01n\x00\x00\x00\x01v" + (2).to_bytes(8, "big") + b"bo"
    )


def test_envelope_round_trip(impl):
    framed = impl.encode_envelope(*ENVELOPE_ARGS)
    assert impl.encode_envelope("id-ü", dict(ENVELOPE_ARGS[1]), bytearray(b"\x00body\xff"), 123, 2**64 - 1) == framed
    assert impl.decode_envelope(framed) == ("id-ü", dict(ENVELOPE_ARGS[1]), b"\x00body\xff", 123, 2**64 - 1)
    assert impl.decode_envelope(bytearray(framed)) == impl.decode_envelope(memoryview(b"xx" + framed)[2:])
    empty = impl.encode_envelope("", [], b"", 0, 0)
    assert impl.decode_envelope(empty) == ("", {}, b"", 0, 0)


def test_envelope_repeated_header_later_wins(impl):
    framed = impl.encode_envelope("x", [("a", "1"), ("b", "2"), ("a", "3")], b"", 0, 0)
    assert impl.decode_envelope(framed)[1] == {"a": "3", "b": "2"}


def test_envelope_every_truncation_and_extension_fails(impl):
    framed = impl.encode_envelope(*ENVELOPE_ARGS)
    for cut in range(len(framed)):
        with pytest.raises(FramingError):
            impl.decode_envelope(framed[:cut])
    with pytest.raises(FramingError):
        impl.decode_envelope(framed + b"\x00")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: b"XW" + f[2:],  # magic
        lambda f: f[:2] + b"\x02" + f[3:],  # version
        lambda f: f[:19] + b"\xff\xff\xff\xff" + f[23:],  # id length way past the end
        lambda f: f[:-9] + b"\xff" * 8 + f[-1:],  # body length way past the end
    ],
)
def test_envelope_corrupt(impl, mutate):
    framed = impl.encode_envelope("x", {"a": "b"}, b"z", 0, 0)
    with pytest.raises(FramingError):
        impl.decode_envelope(mutate(framed))


def test_envelope_invalid_utf8(impl):
    framed = impl.encode_envelope("xy", {}, b"", 0, 0).replace(b"xy", b"\xc3\x28")
    with pytest.raises(FramingError):
        impl.decode_envelope(framed)


def test_envelope_random_garbage_never_crashes(impl):
    rng = random.Random(20260820)
    valid = impl.encode_envelope(*ENVELOPE_ARGS)
    for _ in range(3000):
        garbage = rng.randbytes(rng.randrange(0, 80))
        if not garbage.startswith(b"GW\x01"):
            with pytest.raises(FramingError):
                impl.decode_envelope(garbage)
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            impl.decode_envelope(bytes(mutated))
        except FramingError:
            pass


# ---- §8.1 plain submit and its variants -------------------------------------------------------

def test_plain_submit(impl):
    env = frame(impl, PLAIN_SUBMIT)
    assert type(env).__name__ == "Envelope"
    assert env.id == MSG_ID
    assert env.key == b"RemoteSite\x00" + MSG_ID.encode()
    assert env.call_type == impl.CALL_SUBMIT == 0
    assert env.headers == PLAIN_SUBMIT_MESSAGE_HEADERS
    assert list(env.headers) == list(PLAIN_SUBMIT_MESSAGE_HEADERS)  # wire order kept
    assert env.body == BODY and type(env.body) is bytes
    assert (env.expiry_ms, env.accepted_ms, env.callback) == (0, NOW, None)
    assert env.framed == impl.encode_envelope(MSG_ID, PLAIN_SUBMIT_MESSAGE_HEADERS, BODY, 0, NOW)
    assert impl.decode_envelope(env.framed) == (MSG_ID, PLAIN_SUBMIT_MESSAGE_HEADERS, BODY, 0, NOW)


def test_plain_submit_without_content_md5_is_accepted_unverified(impl):
    env = frame(impl, edit(PLAIN_SUBMIT, drop=["Content-MD5"]), body=b"anything")
    assert env.body == b"anything" and env.headers == PLAIN_SUBMIT_MESSAGE_HEADERS


@pytest.mark.parametrize(
    ("pairs", "status", "reason"),
    [
        (
            edit(PLAIN_SUBMIT, {"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg%3D%3D"}),
            412,
            "MD5 hash received does not match hash calculated on server. Please resubmit.",
        ),
        (edit(PLAIN_SUBMIT, drop=["NServiceBus.Id"]), 400, "Required header 'NServiceBus.Id' missing."),
        (
            edit(PLAIN_SUBMIT, {"NServiceBus.CallType": "Submit"}),
            400,
            "Invalid CallType 'Submit'. CallTypes supported 'SingleCallSubmit, SingleCallDatabusProperty'",
        ),
        (edit(PLAIN_SUBMIT, drop=["NServiceBus.CorrelationId"]), 502, "Unexpected server error"),
    ],
    ids=["md5-mismatch", "no-id", "legacy-calltype", "no-correlation-id"],
)
def test_plain_submit_variants(impl, pairs, status, reason):
    assert_rejected(frame(impl, pairs), status, reason)


# ---- validation order and details ------------------------------------------------------------

MINIMAL = [("NServiceBus.Id", "m1"), ("NServiceBus.CallType", "SingleCallSubmit")]

INVALID = "CallTypes supported 'SingleCallSubmit, SingleCallDatabusProperty'"
NO_DATABUS_KEY = "Required header 'NServiceBus.Gateway.DataBusKey' missing."


@pytest.mark.parametrize(
    ("pairs", "status", "reason"),
    [
        ([], 400, "Required header 'NServiceBus.Id' missing."),
        ([("NServiceBus.Id", ""), MINIMAL[1]], 400, "Required header 'NServiceBus.Id' missing."),
        ([("NServiceBus.Id", "+%09+"), MINIMAL[1]], 400, "Required header 'NServiceBus.Id' missing."),
        ([("NServiceBus.Id", "%C2%A0%E3%80%80"), MINIMAL[1]], 400, "Required header 'NServiceBus.Id' missing."),
        ([MINIMAL[0]], 400, "Required header 'NServiceBus.CallType' missing."),
        ([MINIMAL[0], ("NServiceBus.CallType", "")], 400, f"Invalid CallType ''. {INVALID}"),
        ([MINIMAL[0], ("NServiceBus.CallType", "Ack")], 400, f"Invalid CallType 'Ack'. {INVALID}"),
        ([MINIMAL[0], ("NServiceBus.CallType", "DatabusProperty")], 400, f"Invalid CallType 'DatabusProperty'. {INVALID}"),
        ([MINIMAL[0], ("NServiceBus.CallType", "singlecallsubmit")], 400, f"Invalid CallType 'singlecallsubmit'. {INVALID}"),
        ([MINIMAL[0], ("NServiceBus.CallType", "2")], 400, f"Invalid CallType '2'. {INVALID}"),
        ([MINIMAL[0], ("NServiceBus.CallType", "+Ack+")], 400, f"Invalid CallType ' Ack '. {INVALID}"),
        ([MINIMAL[0], ("NServiceBus.CallType", "SingleCallDatabusProperty")], 400, NO_DATABUS_KEY),
        ([MINIMAL[0], ("NServiceBus.CallType", "1"), ("NServiceBus.Gateway.DataBusKey", "+")], 400, NO_DATABUS_KEY),
        (
            [MINIMAL[0], ("NServiceBus.CallType", "Z%C3%BCrich%0A%7F")],
            400,
            f"Invalid CallType 'Z?rich??'. {INVALID}",
        ),
    ],
)
def test_rejections(impl, pairs, status, reason):
    assert_rejected(frame(impl, pairs), status, reason)


@pytest.mark.parametrize("call_type", ["SingleCallSubmit", "0", "+SingleCallSubmit%09", "%E3%80%800+"])
def test_call_type_submit_forms(impl, call_type):
    env = frame(impl, [MINIMAL[0], ("NServiceBus.CallType", call_type)])
    assert env.call_type == impl.CALL_SUBMIT


def test_validation_order(impl):
    # id before call type, call type before MD5; a databus part's MD5 before its DataBusKey
    # (NServiceBus stores the blob, verifies it, then wants the key)
    assert frame(impl, [("NServiceBus.CallType", "Nope")]).status == 400
    assert "Id" in frame(impl, [("NServiceBus.CallType", "Nope")]).reason
    assert frame(impl, [MINIMAL[0], ("NServiceBus.CallType", "1"), ("Content-MD5", "bad")]).status == 412
    bad_md5_and_parts = MINIMAL + [("Content-MD5", "bad"), ("NServiceBus.Header.NServiceBus.DataBus.k", "k")]
    assert frame(impl, bad_md5_and_parts).status == 412
    assert frame(impl, bad_md5_and_parts).reason.startswith("MD5")
    # the parts of a submit are looked up by the writer, after framing
    parts = frame(impl, MINIMAL + [("NServiceBus.Header.NServiceBus.DataBus.k", "k"), ("NServiceBus.Gateway", "True")])
    assert parts.status == 502  # no correlation id: framing goes on past the parts


def test_reason_is_clean_ascii_and_bounded(impl):
    result = frame(impl, [MINIMAL[0], ("NServiceBus.CallType", "%E2%82%AC" * 600)])
    assert result.status == 400 and len(result.reason) == 512
    assert result.reason == ("Invalid CallType '" + "?" * 600)[:512]
    assert impl.Rejection(400, "a\u00e9\r\nb").reason == "a???b"


@pytest.mark.parametrize(
    ("parts", "n"),
    [
        (["NServiceBus.Header.NServiceBus.DataBus.9999-12-31_23%2F7d0d3c1e-2f4a-4b7e-9a51-0c8d2f6e4b11"], 1),
        (["NServiceBus.Header.NServiceBus.DataBus.a", "NServiceBus.Header.NServiceBus.DataBus.b"], 2),
        (["nservicebus.header.nservicebus.databus.a"], 1),
        (["NServiceBus.DataBus.Shared.Msg.Payload"], 1),
    ],
)
def test_databus_headers_of_a_submit_are_listed_for_the_writer(impl, parts, n):
    pairs = PLAIN_SUBMIT + [(name, "key") for name in parts]
    env = frame(impl, pairs)
    assert len(env.databus) == n
    for (wire, stored), name in zip(env.databus, parts):
        assert wire == urllib.parse.unquote(name)
        # a gateway message keeps NServiceBus.Header.* headers only, without the prefix
        assert stored == (None if not name.lower().startswith("nservicebus.header.") else wire[19:])
        if stored is not None:
            assert env.headers[stored] == "key"


def test_databus_part_framed_whole(impl):
    pairs = [MINIMAL[0], ("NServiceBus.CallType", "SingleCallDatabusProperty"),
             ("NServiceBus.Gateway.DataBusKey", "NServiceBus.Header.NServiceBus.DataBus.a%2Fb"),
             ("NServiceBus.TimeToBeReceived", "00%3A00%3A10"), ("Content-MD5", "4HJGsZlkhfKtZTbdlkaTgw%3D%3D")]
    env = frame(impl, pairs, body=b"myData", now=1000)
    assert (env.call_type, env.databus_key, env.content_md5) == (impl.CALL_DATABUS, "NServiceBus.Header.NServiceBus.DataBus.a/b", "4HJGsZlkhfKtZTbdlkaTgw==")
    assert (env.id, env.key, env.body, env.framed, env.headers, env.expiry_ms) == ("m1", b"RemoteSite\x00m1", b"myData", b"", {}, 11000)
    bad = frame(impl, pairs, body=b"other", now=1000)
    assert bad.status == 412


def test_databus_config_content_type_is_not_a_part(impl):
    pairs = PLAIN_SUBMIT + [("NServiceBus.Header.NServiceBus.DataBusConfig.ContentType", "application%2Fjson")]
    env = frame(impl, pairs)
    assert env.headers["NServiceBus.DataBusConfig.ContentType"] == "application/json"


# ---- id ----------------------------------------------------------------------------------------

def test_id_length_limit_counts_utf8_bytes(impl):
    assert frame(impl, [("NServiceBus.Id", "x" * 16), MINIMAL[1]], max_id_bytes=16).id == "x" * 16
    assert_rejected(
        frame(impl, [("NServiceBus.Id", "x" * 17), MINIMAL[1]], max_id_bytes=16),
        400,
        "Header 'NServiceBus.Id' is longer than 16 bytes.",
    )
    assert_rejected(
        frame(impl, [("NServiceBus.Id", "x" * 15 + "%C3%BC"), MINIMAL[1]], max_id_bytes=16),
        400,
        "Header 'NServiceBus.Id' is longer than 16 bytes.",
    )
    assert frame(impl, [("NServiceBus.Id", "x" * 400), MINIMAL[1]]).id == "x" * 400
    assert frame(impl, [("NServiceBus.Id", "x" * 401), MINIMAL[1]]).status == 400


def test_id_is_decoded_and_keyed_by_scope(impl):
    pairs = [("NServiceBus.Id", "a%2Fb+c%C3%BC"), MINIMAL[1]]
    env = impl.Framer("Site\u00e9").frame(wire(pairs), b"", None, NOW)
    assert env.id == "a/b cü"
    assert env.key == "Site\u00e9".encode() + b"\x00" + "a/b cü".encode()
    other = impl.Framer("Other").frame(wire(pairs), b"", None, NOW)
    assert other.key != env.key and other.id == env.id


def test_id_keeps_surrounding_whitespace(impl):
    assert frame(impl, [("NServiceBus.Id", "+x+"), MINIMAL[1]]).id == " x "


# ---- header decoding and case ----------------------------------------------------------------

def test_control_headers_are_case_insensitive(impl):
    pairs = [
        ("nservicebus.id", "m1"),
        ("NSERVICEBUS.CALLTYPE", "SingleCallSubmit"),
        ("content-md5", "4HJGsZlkhfKtZTbdlkaTgw%3d%3d"),
        ("nServiceBus.gateway", ""),
        ("nservicebus.correlationid", "c1"),
        ("NSERVICEBUS.TIMETOBERECEIVED", "00%3A00%3A10"),
    ]
    env = frame(impl, pairs, body=b"myData")
    assert env.headers == {"NServiceBus.CorrelationId": "c1"}
    assert env.expiry_ms == NOW + 10_000


def test_encoded_control_header_names(impl):
    env = frame(impl, [("NServiceBus%2EId", "m1"), ("NServiceBus%2ecallType", "0")])
    assert env.id == "m1"


@pytest.mark.parametrize(
    "pairs",
    [
        MINIMAL + [("NServiceBus.Id", "m2")],
        MINIMAL + [("nservicebus.id", "m1")],
        MINIMAL + [("NServiceBus%2EId", "m1")],
        MINIMAL + [("X-A", "1"), ("x-a", "2")],
    ],
)
def test_duplicate_headers_are_400(impl, pairs):
    result = frame(impl, pairs)
    assert result.status == 400
    second = impl.url_decode(wire(pairs)[-2])
    assert result.reason == f"Header '{second}' appears more than once."


def test_lower_cased_header_prefix_is_kept(impl):
    pairs = [
        ("nservicebus.header.NServiceBus.MessageId", MSG_ID),
        ("NSERVICEBUS.HEADER.NServiceBus.MessageIntent", "Send"),
        ("NServiceBus.Header.NServiceBus.Header.RouteTo", "q"),
        ("NServiceBus.Header.x.nservicebus.header.y", "z"),
        ("NServiceBus.HeaderX", "kept-as-is"),
        ("X-NServiceBus.Header.Inner", "i"),
        ("NServiceBus.Header.Zürich", "gr%C3%BCezi"),
        ("NServiceBus.Header.", "empty-name"),
        ("NServiceBus.Gateway", "True"),
        ("NServiceBus.CorrelationId", "c1"),
    ]
    env = frame(impl, MINIMAL + pairs)
    assert env.headers == {
        "NServiceBus.MessageId": MSG_ID,
        "NServiceBus.MessageIntent": "Send",
        "RouteTo": "q",
        "x.y": "z",
        "NServiceBus.HeaderX": "kept-as-is",
        "X-Inner": "i",
        "Zürich": "grüezi",
        "": "empty-name",
        "NServiceBus.CorrelationId": "c1",
    }


def test_top_level_correlation_id_overrides(impl):
    env = frame(impl, edit(PLAIN_SUBMIT, {"NServiceBus.CorrelationId": "top"}))
    assert env.headers["NServiceBus.CorrelationId"] == "top"


def test_plus_and_lower_hex_values(impl):
    env = frame(impl, MINIMAL + [("X", "a+b%3d%3Dc%2b")])
    assert env.headers["X"] == "a b==c+"


def test_raw_non_ascii_header_bytes_pass_through(impl):
    env = impl.Framer("S").frame(wire(MINIMAL) + ["Zürich".encode(), b"gr\xc3\xbcezi \xff"], b"", None, NOW)
    assert env.headers["Zürich"] == "grüezi \ufffd"


def test_custom_message_keeps_all_headers(impl):
    pairs = [
        ("Host", "localhost:25900"),
        ("NServiceBus.Id", "m1"),
        ("NServiceBus.CallType", "SingleCallSubmit"),
        ("NServiceBus.AutoAck", "true"),
        ("Content-MD5", "4HJGsZlkhfKtZTbdlkaTgw%3D%3D"),
        ("MySpecialHeader", "my+value"),
        ("NServiceBus.Header.X", "stays-prefixed"),
        ("Content-Length", "6"),
    ]
    env = frame(impl, pairs, body=b"myData")
    assert env.headers == {
        "Host": "localhost:25900",
        "NServiceBus.Id": "m1",
        "NServiceBus.CallType": "SingleCallSubmit",
        "NServiceBus.AutoAck": "true",
        "Content-MD5": "4HJGsZlkhfKtZTbdlkaTgw==",
        "MySpecialHeader": "my value",
        "NServiceBus.Header.X": "stays-prefixed",
        "Content-Length": "6",
    }


# ---- TimeToBeReceived -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("ttbr", "gateway_expiry", "custom_expiry"),
    [
        (None, 0, 0),
        ("00%3A00%3A10", NOW + 10_000, NOW + 10_000),
        ("1.00%3A00%3A00", NOW + 86_400_000, NOW + 86_400_000),
        ("00%3A00%3A00.5", NOW + 1000, NOW + 500),  # clamped to 1 s for gateway messages only
        ("00%3A00%3A00", NOW + 1000, 0),
        ("-00%3A00%3A05", NOW + 1000, 0),
        ("garbage", NOW + 1000, 0),
        ("", NOW + 1000, 0),
        ("10675199.02%3A48%3A05.4775807", 0, 0),  # TimeSpan.MaxValue: never
        ("36500.00%3A00%3A00", 0, 0),
        ("36499.00%3A00%3A00", NOW + 36499 * 86_400_000, NOW + 36499 * 86_400_000),
    ],
)
def test_time_to_be_received(impl, ttbr, gateway_expiry, custom_expiry):
    extra = [] if ttbr is None else [("NServiceBus.TimeToBeReceived", ttbr)]
    gateway = frame(impl, edit(PLAIN_SUBMIT, drop=["Content-MD5"]) + extra)
    custom = frame(impl, MINIMAL + extra)
    assert (gateway.expiry_ms, custom.expiry_ms) == (gateway_expiry, custom_expiry)
    assert impl.decode_envelope(gateway.framed)[3] == gateway_expiry


def test_expiry_never_overflows(impl):
    env = frame(impl, MINIMAL + [("NServiceBus.TimeToBeReceived", "1.00:00:00")], now=2**64 - 10)
    assert env.expiry_ms == 0


# ---- query string ------------------------------------------------------------------------------

def test_query_ignored_without_parse_query(impl):
    env = frame(impl, MINIMAL, body=b"real", query=b"Message=fake&callback=cb&NServiceBus.Id=q")
    assert (env.id, env.body, env.callback) == ("m1", b"real", None)
    assert frame(impl, [], query=b"NServiceBus.Id=x&callback=cb").callback is None


def test_query_overrides_and_adds(impl):
    pairs = [("nservicebus.id", "from-header"), ("NServiceBus.CallType", "Nope"), ("X-Keep", "k")]
    query = b"NServiceBus.ID=from-query&nservicebus.calltype=SingleCallSubmit&Added=a&flag&&"
    env = frame(impl, pairs, query=query, parse_query=True)
    assert env.id == "from-query"
    # position kept, spelling from the query, new ones appended in query order
    assert list(env.headers.items()) == [
        ("NServiceBus.ID", "from-query"),
        ("nservicebus.calltype", "SingleCallSubmit"),
        ("X-Keep", "k"),
        ("Added", "a"),
        ("flag", ""),
    ]


def test_query_is_decoded_twice(impl):
    query = b"NServiceBus.Id=m1&NServiceBus.CallType=0&Plus=%252B&Space=%2B&Eq=%253d&K%2545y=v"
    env = frame(impl, [], query=query, parse_query=True)
    assert env.headers["Plus"] == "+"
    assert env.headers["Space"] == " "
    assert env.headers["Eq"] == "="
    assert env.headers["KEy"] == "v"


def test_query_content_md5_needs_double_encoding(impl):
    # a '+' in the base64 value only survives as %252B (protocol.md §1.2 step 3)
    body = b'"AAECAw=="'
    single = b"NServiceBus.Id=m1&NServiceBus.CallType=0&Content-MD5=Nbvu6YGnTj%2B9Hqh2OyA2jw%3D%3D"
    assert frame(impl, [], body=body, query=single, parse_query=True).status == 412
    double = b"NServiceBus.Id=m1&NServiceBus.CallType=0&Content-MD5=Nbvu6YGnTj%252B9Hqh2OyA2jw%253D%253D"
    assert frame(impl, [], body=body, query=double, parse_query=True).body == body


def test_query_message_replaces_body_and_callback(impl):
    md5 = impl.url_encode(impl.url_encode(impl.content_md5("hé llo".encode())))
    query = f"NServiceBus.Id=m1&NServiceBus.CallType=SingleCallSubmit&message=h%25C3%25A9+llo&CALLBACK=cb1&Content-MD5={md5}"
    env = frame(impl, [], body=b"ignored", query=query.encode(), parse_query=True)
    assert env.body == "hé llo".encode()
    assert env.callback == "cb1"
    assert env.headers["message"] == "hé llo"
    assert env.headers["CALLBACK"] == "cb1"


def test_query_callback_on_rejections(impl):
    rejected = frame(impl, [], query=b"callback=jq_1", parse_query=True)
    assert (rejected.status, rejected.callback) == (400, "jq_1")
    duplicate = frame(impl, MINIMAL + MINIMAL, query=b"callback=jq_2", parse_query=True)
    assert (duplicate.status, duplicate.callback) == (400, "jq_2")
    assert frame(impl, [], parse_query=True).callback is None


# ---- inputs, counters, settings ----------------------------------------------------------------

def test_any_buffer_in_owned_bytes_out(impl):
    flat = wire(MINIMAL)
    flat[1] = bytearray(flat[1])
    flat[3] = memoryview(b"..SingleCallSubmit")[2:]
    body = bytearray(b"xxhello")
    env = impl.Framer("S").frame(flat, memoryview(body)[2:], None, NOW)
    assert env.body == b"hello" and type(env.body) is bytes
    body[2:] = b"HELLO"
    assert env.body == b"hello"


def test_counters(impl):
    framer = impl.Framer("S")
    framer.frame(wire(MINIMAL), b"", None, NOW)
    framer.frame(wire(MINIMAL), b"", None, NOW)
    framer.frame([], b"", None, NOW)
    assert (framer.framed_total, framer.rejected_total) == (2, 1)


def test_odd_header_list(impl):
    with pytest.raises(InternalError):
        impl.Framer("S").frame([b"NServiceBus.Id"], b"", None, NOW)


@pytest.mark.parametrize(("scope", "args"), [("a\x00b", {}), ("S", {"max_id_bytes": 0})])
def test_framer_settings(impl, scope, args):
    with pytest.raises(ConfigurationError):
        impl.Framer(scope, **args)


# ---- extension-only surface --------------------------------------------------------------------

def test_extension_objects():
    assert isinstance(_dedup.DEBUG_BUILD, bool)
    framer = _dedup.Framer("S", max_id_bytes=10, parse_query=True)
    assert (framer.scope, framer.max_id_bytes, framer.parse_query) == ("S", 10, True)
    env = framer.frame(wire(MINIMAL), b"", None, NOW)
    with pytest.raises(AttributeError):
        env.id = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        _dedup.Envelope()
    assert "m1" in repr(env)
    assert repr(_dedup.Rejection(400, "x")) == "<Rejection 400 'x'>"
    with pytest.raises(TypeError):
        framer.frame([MINIMAL[0][0], 5], b"", None, NOW)
    with pytest.raises(OverflowError):
        framer.frame([], b"", None, -1)
