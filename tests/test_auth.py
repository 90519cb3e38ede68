"""gwcore.auth: v1 request signatures (HMAC-SHA256), every refusal reason, the time window."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwcore import auth
from gwcore._core import core
from gwcore.errors import AuthenticationError, GatewayError

SECRET = b"0123456789abcdef0123456789abcdef"
SECRETS = {"hq": SECRET, "other": b"another secret of 32 bytes......"}
NOW = 1_800_000_000  # 2027-01-15T08:00:00Z
PATH = "/RemoteSite/"
MSG_ID = "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"
BODY = b'{"Hello":"World"}'


def signed(body=BODY, msg_id=MSG_ID, path=PATH, method="POST", now=NOW, key_id="hq", secret=SECRET):
    return {k.decode(): v.decode() for k, v in auth.signature_headers(secret, key_id, method, path, msg_id, body, now)}


def check(headers, *, body=BODY, msg_id=MSG_ID, path=PATH, method="POST", now=NOW, skew=300, secrets=SECRETS):
    auth.verify(secrets, method, path, headers, msg_id, auth.body_digest(body), now, skew)


def reason(headers, **kw) -> str:
    with pytest.raises(AuthenticationError) as err:
        check(headers, **kw)
    return err.value.reason


def test_round_trip_and_header_shape():
    h = signed()
    assert list(h) == ["gwcore-Date", "gwcore-Signature"]
    assert h["gwcore-Date"] == "20270115T080000Z"
    version, key_id, sig = h["gwcore-Signature"].split(".")
    assert (version, key_id, len(sig)) == ("v1", "hq", 43)
    check(h)
    # a callable lookup and bytes values work as well as a mapping
    check(lambda name: h.get(name, "").encode() or None)


def test_canonical_string_is_as_documented():
    digest = base64.b64encode(hashlib.sha256(BODY).digest()).decode()
    assert auth.body_digest(BODY) == digest
    canonical = f"gwcore-v1\nPOST\n{PATH}\n20270115T080000Z\n{MSG_ID}\n{digest}".encode()
    expected = base64.urlsafe_b64encode(hmac.new(SECRET, canonical, hashlib.sha256).digest()).rstrip(b"=").decode()
    assert auth.sign(SECRET, "post", PATH, "20270115T080000Z", MSG_ID, digest) == expected
    assert signed()["gwcore-Signature"] == f"v1.hq.{expected}"


def test_values_survive_dotnet_url_encoding_and_decoding():
    # a receiver may look the headers up raw or URL-decoded; both must give the same text
    for name, value in signed().items():
        assert core.url_encode(name) == name
        assert core.url_encode(value) == value
        assert core.url_decode(value.encode()) == value
        assert "." not in name and "_" not in name


def test_error_is_a_gateway_error_with_a_reason():
    with pytest.raises(GatewayError) as err:
        check({})
    assert err.value.reason == auth.MISSING_SIGNATURE
    assert "gwcore-Signature" in str(err.value)


@pytest.mark.parametrize("mutate, expected", [
    (lambda h: h.pop("gwcore-Signature"), auth.MISSING_SIGNATURE),
    (lambda h: h.update({"gwcore-Signature": "  "}), auth.MISSING_SIGNATURE),
    (lambda h: h.update({"gwcore-Signature": "v2" + h["gwcore-Signature"][2:]}), auth.MALFORMED_SIGNATURE),
    (lambda h: h.update({"gwcore-Signature": h["gwcore-Signature"] + "A"}), auth.MALFORMED_SIGNATURE),
    (lambda h: h.update({"gwcore-Signature": h["gwcore-Signature"].replace("v1.hq.", "v1.hq.x.")}),
     auth.MALFORMED_SIGNATURE),
    (lambda h: h.update({"gwcore-Signature": "Bearer abc"}), auth.MALFORMED_SIGNATURE),
    (lambda h: h.update({"gwcore-Signature": h["gwcore-Signature"].replace(".hq.", ".nobody.")}), auth.UNKNOWN_KEY),
    (lambda h: h.update({"gwcore-Signature": h["gwcore-Signature"].replace(".hq.", ".other.")}), auth.BAD_SIGNATURE),
    (lambda h: h.pop("gwcore-Date"), auth.MISSING_DATE),
    (lambda h: h.update({"gwcore-Date": ""}), auth.MISSING_DATE),
    (lambda h: h.update({"gwcore-Date": "20270115T080001Z"}), auth.BAD_SIGNATURE),
])
def test_each_refusal_reason(mutate, expected):
    h = signed()
    mutate(h)
    assert reason(h) == expected


@pytest.mark.parametrize("date_value", ["Fri, 15 Jan 2027 08:00:00 GMT", "2027-01-15T08:00:00Z", "20271315T080000Z",
                                        "20270230T080000Z", "20270115T250000Z", "1800000000"])
def test_unparseable_date_is_bad_date_even_when_signed(date_value):
    # a genuine sender with a broken clock format: the signature matches, the date does not parse
    sig = auth.sign(SECRET, "POST", PATH, date_value, MSG_ID, auth.body_digest(BODY))
    h = {"gwcore-Date": date_value, "gwcore-Signature": f"v1.hq.{sig}"}
    assert reason(h) == auth.BAD_DATE


def test_skew_boundaries():
    h = signed(now=NOW)
    check(h, now=NOW + 300, skew=300)          # exactly at the limit, both ways
    check(h, now=NOW - 300, skew=300)
    check(h, now=NOW + 300.0, skew=300)
    with pytest.raises(AuthenticationError, match="stale or replayed") as err:
        check(h, now=NOW + 300.5, skew=300)
    assert err.value.reason == auth.DATE_OUT_OF_WINDOW
    with pytest.raises(AuthenticationError, match="in the future") as err:
        check(h, now=NOW - 301, skew=300)
    assert err.value.reason == auth.DATE_OUT_OF_WINDOW
    # a day-old capture
    assert reason(h, now=NOW + 86400) == auth.DATE_OUT_OF_WINDOW
    # fractional seconds of the signing time are dropped: the date is the whole second
    assert signed(now=NOW + 0.999)["gwcore-Date"] == "20270115T080000Z"


def test_replay_within_the_window_verifies():
    # documented: accepted again, and the receiver's dedup on NServiceBus.Id makes it harmless
    h = signed()
    check(h, now=NOW + 10)
    check(h, now=NOW + 20)


@pytest.mark.parametrize("field, value", [
    ("body", b'{"Hello":"world"}'),
    ("body", BODY + b" "),
    ("body", b""),
    ("path", "/RemoteSite"),
    ("path", "/remotesite/"),
    ("path", "/OtherSite/"),
    ("msg_id", MSG_ID.upper()),
    ("msg_id", MSG_ID + "\n"),
    ("method", "PUT"),
])
def test_tampering_breaks_the_signature(field, value):
    assert reason(signed(), **{field: value}) == auth.BAD_SIGNATURE


def test_wrong_secret():
    assert reason(signed(secret=b"x" * 32)) == auth.BAD_SIGNATURE


def test_sign_refuses_short_secrets_newlines_and_bad_key_ids():
    with pytest.raises(ValueError):
        auth.sign(b"short", "POST", PATH, "20270115T080000Z", MSG_ID, "d")
    for args in (("PO\nST", PATH, "d", "x"), ("POST", "/a\n/", "d", "x"), ("POST", PATH, "d\n", "x"),
                 ("POST", PATH, "d", "x\n")):
        method, path, date_value, digest = args
        with pytest.raises(ValueError):
            auth.sign(SECRET, method, path, date_value, MSG_ID, digest)
    for key_id in ("", "a.b", "a b", "k" * 65, "ü"):
        with pytest.raises(ValueError):
            auth.signature_headers(SECRET, key_id, "POST", PATH, MSG_ID, BODY, NOW)
    # the message id is the one field allowed to hold a newline (the string still splits one way)
    auth.sign(SECRET, "POST", PATH, "20270115T080000Z", "a\nb", "d")


def test_signature_comparison_uses_compare_digest(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    check(signed())
    assert len(calls) == 1


def _flip(data: bytes, index: int, new: int) -> bytes:
    return data[:index] + bytes([new]) + data[index + 1:]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=1, max_size=200), data=st.data())
def test_any_single_byte_change_of_the_body_breaks_verification(body, data):
    h = signed(body=body)
    check(h, body=body)
    i = data.draw(st.integers(0, len(body) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != body[i]))
    assert reason(h, body=_flip(body, i, new)) == auth.BAD_SIGNATURE


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_character_change_of_a_signed_field_breaks_verification(data):
    h = signed()
    fields = {"path": PATH, "msg_id": MSG_ID, "date": h["gwcore-Date"], "sig": h["gwcore-Signature"]}
    which = data.draw(st.sampled_from(sorted(fields)))
    old = fields[which].encode()
    i = data.draw(st.integers(0, len(old) - 1))
    new = data.draw(st.integers(1, 127).filter(lambda b: b != old[i] and b != 0x0A))
    changed = _flip(old, i, new).decode()
    kw: dict = {}
    if which == "path":
        kw["path"] = changed
    elif which == "msg_id":
        kw["msg_id"] = changed
    elif which == "date":
        h["gwcore-Date"] = changed
    else:
        h["gwcore-Signature"] = changed
    with pytest.raises(AuthenticationError) as err:
        check(h, **kw)
    # whatever the reason (a changed key id is unknown, a changed layout malformed), never accepted
    assert err.value.reason in (auth.BAD_SIGNATURE, auth.MALFORMED_SIGNATURE, auth.UNKNOWN_KEY,
                                auth.MISSING_SIGNATURE, auth.MISSING_DATE)
