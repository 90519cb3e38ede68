"""gwcore.auth: request signatures v1 and v2 (HMAC-SHA256), every refusal reason, the time window,
the v2 canonical form (docs/sending.md's test vector; the reference against the framer's build)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

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
    # an unknown key id is a bad signature, like a wrong secret: which ids exist is not told
    (lambda h: h.update({"gwcore-Signature": h["gwcore-Signature"].replace(".hq.", ".nobody.")}), auth.BAD_SIGNATURE),
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
    assert err.value.reason in (auth.BAD_SIGNATURE, auth.MALFORMED_SIGNATURE,
                                auth.MISSING_SIGNATURE, auth.MISSING_DATE)


# -- scheme v2 ---------------------------------------------------------------------------------------

# docs/sending.md, "Request signing scheme v2", test vector: these headers (as on the wire), this
# body, signed at NOW with SECRET under key id "hq", for POST /RemoteSite/.
VECTOR_HEADERS = [
    (b"NServiceBus.Id", MSG_ID.encode()),
    (b"NServiceBus.CorrelationId", MSG_ID.encode()),
    (b"NServiceBus.Header.NServiceBus.EnclosedMessageTypes", b"Shared.UpdatePrice%2C+Shared"),
    (b"NServiceBus.Header.Note%3ASubject", b"two%0Alines+and+a+%5C"),
    (b"NServiceBus.Gateway", b"True"),
    (b"NServiceBus.CallType", b"SingleCallSubmit"),
    (b"Content-MD5", b"0S9RmNGZjrrjq41F3ZZBjw%3D%3D"),
]
VECTOR_CANONICAL = (
    "gwcore-v2\n"
    "POST\n"
    "/RemoteSite/\n"
    "content-digest:sha-256=:ZaTEylrPxL87NOE4yAhzD2yc4UGkxriJqTReZslznXM=:\n"
    "content-md5:0S9RmNGZjrrjq41F3ZZBjw==\n"
    "gwcore-date:20270115T080000Z\n"
    "nservicebus.calltype:SingleCallSubmit\n"
    "nservicebus.correlationid:0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3\n"
    "nservicebus.gateway:True\n"
    "nservicebus.header.note\\:subject:two\\nlines and a \\\\\n"
    "nservicebus.header.nservicebus.enclosedmessagetypes:Shared.UpdatePrice, Shared\n"
    "nservicebus.id:0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"
)
VECTOR_SIGNATURE = "v2.hq.r1YBC0KEX0CXHjkrDfUms-kXYGXoyQ4JvUKOvHq5g1I"


def test_v2_test_vector_of_the_docs():
    added = auth.signature_headers_v2(SECRET, "hq", "POST", PATH, VECTOR_HEADERS, BODY, now=NOW)
    assert added == [
        (b"Content-Digest", b"sha-256%3D%3AZaTEylrPxL87NOE4yAhzD2yc4UGkxriJqTReZslznXM%3D%3A"),
        (b"gwcore-Date", b"20270115T080000Z"),
        (b"gwcore-Signature", VECTOR_SIGNATURE.encode()),
    ]
    # the HMAC of the documented string, computed here without gwcore
    mac = hmac.new(SECRET, VECTOR_CANONICAL.encode("utf-8"), hashlib.sha256).digest()
    assert "v2.hq." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == VECTOR_SIGNATURE
    # the reference build, the compiled build and the framer's agree on it
    decoded = [(core.url_decode(n), core.url_decode(v)) for n, v in VECTOR_HEADERS + added]
    lines = auth.canonical_headers(decoded)
    assert auth.canonical_v2("post", PATH, lines).decode() == VECTOR_CANONICAL
    block = b"".join(n + b": " + v + b"\r\n" for n, v in VECTOR_HEADERS + added)
    assert core.signing_headers(block) == lines
    framer = core.Framer("RemoteSite", signatures=True)
    env = framer.frame([x for pair in VECTOR_HEADERS + added for x in pair], BODY, None, 0)
    assert env.auth_headers == lines and env.content_digest == f"sha-256=:{auth.body_digest(BODY)}:"
    # the docs show the same vector
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "sending.md"), encoding="utf-8").read()
    assert VECTOR_CANONICAL in doc and VECTOR_SIGNATURE in doc
    for name, value in VECTOR_HEADERS:
        assert f"{name.decode()}: {value.decode()}" in doc


def test_v2_covers_nservicebus_gwcore_and_digest_headers_only():
    pairs = [("NServiceBus.Id", "1"), ("nservicebus.header.X", "x"), ("GWCORE-Nonce", "n"),
             ("gwcore-Signature", "v2.not.covered"), ("Content-MD5", "m"), ("content-digest", "d"),
             ("Host", "h"), ("Content-Type", "t"), ("X-NServiceBus.Id", "no"), ("NServiceBusX", "no")]
    assert auth.canonical_headers(pairs) == (b"content-digest:d\ncontent-md5:m\ngwcore-nonce:n\n"
                                             b"nservicebus.header.x:x\nnservicebus.id:1")
    with pytest.raises(ValueError, match="more than once"):
        auth.canonical_headers([("NServiceBus.Id", "1"), ("nservicebus.ID", "2")])
    with pytest.raises(ValueError, match="more than once"):
        core.signing_headers(b"NServiceBus.Id: 1\r\nnservicebus.id: 2\r\n")
    with pytest.raises(ValueError, match="not a header line"):
        core.signing_headers(b"NServiceBus.Id 1\r\n")
    # ASCII case only: non-ASCII letters are kept as they are
    assert auth.canonical_headers([("NServiceBus.Header.Größe", "1")]) == "nservicebus.header.größe:1".encode()


def _split_back(lines: bytes) -> list[tuple[str, str]]:
    # the inverse of the escaping: a backslash takes the character after it
    out = []
    for line in lines.decode("utf-8").split("\n") if lines else []:
        name, value, cur, i, in_name = "", "", [], 0, True
        while i < len(line):
            c = line[i]
            if c == "\\":
                cur.append({"n": "\n"}.get(line[i + 1], line[i + 1]))
                i += 2
                continue
            if c == ":" and in_name:
                name, cur, in_name = "".join(cur), [], False
            else:
                cur.append(c)
            i += 1
        value = "".join(cur)
        out.append((name, value))
    return out


_names = st.text(st.sampled_from("aZ.:-\\\n%+ü_"), max_size=8)


@settings(max_examples=400, deadline=None)
@given(headers=st.lists(st.tuples(st.sampled_from(["NServiceBus.", "nservicebus.header.", "gwcore-",
                                                   "X-", "Content-"]).flatmap(
    lambda prefix: _names.map(lambda rest: prefix + rest)), st.text(max_size=12)), max_size=8))
def test_v2_lines_are_the_same_everywhere_and_split_back_one_way(headers):
    # the wire form of each header as gwcore's sender writes it (.NET URL encoding)
    wire = [(core.url_encode(n).encode(), core.url_encode(v).encode()) for n, v in headers]
    decoded = [(core.url_decode(n), core.url_decode(v)) for n, v in wire]
    low = [n.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")) for n, _ in decoded]
    if len(set(low)) < len(low):
        with pytest.raises(ValueError):
            auth.canonical_headers(decoded)
        return
    lines = auth.canonical_headers(decoded)
    assert core.signing_headers(b"".join(n + b": " + v + b"\r\n" for n, v in wire)) == lines
    framer = core.Framer("RemoteSite", signatures=True)
    flat = [x for pair in wire for x in pair] + [b"NServiceBus.Id", b"m", b"gwcore-Signature", b"v2.hq.x"]
    if "nservicebus.id" not in low and "gwcore-signature" not in low:
        env = framer.frame(flat, b"", None, 0)
        assert env.auth_headers == auth.canonical_headers(decoded + [("NServiceBus.Id", "m")])
    covered = sorted((n, v) for n, v in zip(low, (v for _, v in decoded))
                     if (n.startswith(("nservicebus.", "gwcore-")) and n != "gwcore-signature")
                     or n in ("content-md5", "content-digest"))
    assert _split_back(lines) == covered


def test_framer_builds_the_v2_lines_for_v2_signatures_only():
    flat = [b"NServiceBus.Id", b"m", b"NServiceBus.CallType", b"SingleCallSubmit", b"NServiceBus.Header.A", b"1"]
    signed_framer = core.Framer("RemoteSite", signatures=True)
    v2 = signed_framer.frame(flat + [b"gwcore-Signature", b"v2.hq.x"], b"", None, 0)
    assert v2.auth_headers == b"nservicebus.calltype:SingleCallSubmit\nnservicebus.header.a:1\nnservicebus.id:m"
    assert signed_framer.frame(flat + [b"gwcore-Signature", b"v1.hq.x"], b"", None, 0).auth_headers is None
    assert signed_framer.frame(flat, b"", None, 0).auth_headers is None
    unsigned_framer = core.Framer("RemoteSite")
    assert unsigned_framer.frame(flat + [b"gwcore-Signature", b"v2.hq.x"], b"", None, 0).auth_headers is None
    # a rejection after the id carries them too, so that the signature is checked first
    rejected = signed_framer.frame(flat[:2] + [b"gwcore-Signature", b"v2.hq.x"], b"", None, 0)
    assert type(rejected) is core.Rejection and rejected.auth_headers == b"nservicebus.id:m"
    # the query string (GWCORE_HTTP_ALLOW_GET) is signed with the target: the lines are the headers'
    get_framer = core.Framer("RemoteSite", signatures=True, parse_query=True)
    env = get_framer.frame(flat + [b"gwcore-Signature", b"v2.hq.x"], b"", b"NServiceBus.Header.A=2", 0)
    assert b"nservicebus.header.a:1" in env.auth_headers


class _Result:
    """What a framer hands the Verifier, made by hand."""

    def __init__(self, headers, body=BODY, target=PATH, method="POST"):
        decoded = [(core.url_decode(n), core.url_decode(v)) for n, v in headers]
        get = {n.lower(): v for n, v in decoded}.get
        self.id = get("nservicebus.id")
        self.auth_signature = get("gwcore-signature")
        self.auth_date = get("gwcore-date")
        self.content_digest = get("content-digest")
        self.auth_headers = (auth.canonical_headers(decoded)
                             if (self.auth_signature or "").startswith("v2.") else None)
        self.body, self.target, self.method = body, target, method


def v2_result(headers=VECTOR_HEADERS, body=BODY, *, sign_body=None, secret=SECRET, key_id="hq", now=NOW,
              extra=()):
    added = auth.signature_headers_v2(secret, key_id, "POST", PATH, headers,
                                      body if sign_body is None else sign_body, now=now)
    return _Result(list(headers) + added + list(extra), body)


def verifier(**kw):
    kw.setdefault("clock", lambda: NOW)
    return auth.Verifier(SECRETS.items(), 300, False, **kw)


def test_verifier_v2_accepts_and_refuses():
    v = verifier()
    assert v.check(v2_result()) is None
    assert v.check(v2_result(key_id="other", secret=SECRETS["other"])) is None
    status, reason = v.check(v2_result(extra=[(b"NServiceBus.Header.X", b"added")]))
    assert status == 401 and reason.startswith("Unauthorized: bad-signature (")
    # signed over another body: the head holds, the body does not: 412, after the HMAC
    assert v.check(v2_result(sign_body=b"other")) == (412, auth.DIGEST_MISMATCH)
    assert v.check(v2_result(sign_body=b"other", secret=b"y" * 32))[0] == 401
    # a streamed part's body is checked by its receiver against the declared digest
    assert v.check(v2_result(sign_body=b"other"), streamed=True) is None
    no_digest = v2_result()
    no_digest.content_digest = None
    status, reason = v.check(no_digest)
    assert status == 401 and reason.startswith("Unauthorized: missing-digest (a v2 signature needs Content-Digest")


def test_unknown_key_and_wrong_secret_get_the_same_answer():
    v = verifier()
    unknown = v.check(v2_result(key_id="nobody"))
    wrong = v.check(v2_result(secret=b"x" * 32))
    assert unknown == wrong and unknown[0] == 401 and "nobody" not in unknown[1]
    v1 = {k: v for k, v in signed(key_id="nobody").items()}
    r1 = _Result([(b"NServiceBus.Id", MSG_ID.encode())] + [(k.encode(), x.encode()) for k, x in v1.items()])
    r2 = _Result([(b"NServiceBus.Id", MSG_ID.encode())] + [(k.encode(), x.encode()) for k, x in signed(secret=b"x" * 32).items()])
    assert v.check(r1) == v.check(r2) == unknown


def test_v1_accepted_by_default_and_refused_without_accept_v1():
    r = _Result([(b"NServiceBus.Id", MSG_ID.encode())] + [(k.encode(), x.encode()) for k, x in signed().items()])
    assert verifier().check(r) is None
    status, reason = verifier(accept_v1=False).check(r)
    assert status == 401 and reason.startswith("Unauthorized: v1-refused (this site accepts scheme v2 signatures only")
    assert verifier(accept_v1=False).check(v2_result()) is None
    # a streamed v1 part needs its declared digest (checked at its head)
    assert verifier().check(r, streamed=True)[1].startswith("Unauthorized: missing-digest (a v1-signed databus part")
    r.content_digest = f"sha-256=:{auth.body_digest(BODY)}:"
    assert verifier().check(r, streamed=True) is None
    r.content_digest = f"sha-256=:{auth.body_digest(b'other')}:"
    assert verifier().check(r, streamed=True)[0] == 401


def test_verify_v2_function():
    added = auth.signature_headers_v2(SECRET, "hq", "POST", PATH, VECTOR_HEADERS, BODY, now=NOW)
    decoded = [(core.url_decode(n), core.url_decode(v)) for n, v in VECTOR_HEADERS + added]
    lines = auth.canonical_headers(decoded)
    auth.verify_v2(SECRETS, "POST", PATH, VECTOR_SIGNATURE, "20270115T080000Z", lines, NOW, 300)
    with pytest.raises(AuthenticationError) as err:
        auth.verify_v2(SECRETS, "POST", "/Other/", VECTOR_SIGNATURE, "20270115T080000Z", lines, NOW, 300)
    assert err.value.reason == auth.BAD_SIGNATURE
    with pytest.raises(AuthenticationError) as err:
        auth.verify_v2(SECRETS, "POST", PATH, VECTOR_SIGNATURE, "20270115T080000Z", lines, NOW + 3600, 300)
    assert err.value.reason == auth.DATE_OUT_OF_WINDOW
    with pytest.raises(AuthenticationError) as err:   # a v1 signature is not a v2 one
        auth.verify_v2(SECRETS, "POST", PATH, signed()["gwcore-Signature"], "20270115T080000Z", lines, NOW, 300)
    assert err.value.reason == auth.MALFORMED_SIGNATURE


@pytest.mark.parametrize("declared, outcome", [
    (f"sha-512=:{base64.b64encode(hashlib.sha512(BODY).digest()).decode()}:, sha-256=:{auth.body_digest(BODY)}:",
     None),                                                   # another member beside it: ignored
    (f"sha-256=:{auth.body_digest(b'other')}:", (412, auth.DIGEST_MISMATCH)),
    ("sha-256=:" + "!" * 44 + ":", (412, auth.DIGEST_MISMATCH)),  # signed, but no body matches it
    ("sha-512=:abc=:", "missing-digest"),                   # no sha-256 member
    ("sha-256=:abc:", "missing-digest"),                    # not 32 bytes
])
def test_v2_declared_digest_forms(declared, outcome):
    headers = [("NServiceBus.Id", MSG_ID), ("Content-Digest", declared), ("gwcore-Date", "20270115T080000Z")]
    lines = auth.canonical_headers(headers)
    signature = "v2.hq." + auth.sign_v2(SECRET, "POST", PATH, lines)
    result = _Result([(n.encode(), core.url_encode(v).encode()) for n, v in headers]
                     + [(b"gwcore-Signature", signature.encode())])
    assert result.auth_headers == lines
    got = verifier().check(result)
    if isinstance(outcome, str):
        assert got[0] == 401 and got[1].startswith(f"Unauthorized: {outcome} (")
    else:
        assert got == outcome


def test_a_v2_signature_the_framer_did_not_take_for_one_is_malformed():
    # "+v2.…" decodes to " v2.…": the framer builds no lines for it, the check must not pass it
    r = v2_result()
    r.auth_signature = " " + r.auth_signature
    r.auth_headers = None
    status, reason = verifier().check(r)
    assert status == 401 and reason.startswith("Unauthorized: malformed-signature (")
