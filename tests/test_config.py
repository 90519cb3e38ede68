"""Configuration: parsing, precedence, clear errors naming the variable."""

from __future__ import annotations

import dataclasses

import pytest

from gwcore import ConfigurationError, Settings
from gwcore.config import (PG_HEARTBEAT, PG_INSTANCE_EXPIRY_MIN, ReceiveChannel, parse_duration, parse_size,
                           variables)


def test_defaults():
    s = Settings.from_env({})
    assert s.mode == "standalone"
    assert s.data_dir == "./var/gwcore"
    assert s.dedup_ttl == 7 * 86400
    assert s.store_sync is True
    assert s.http_allow_get is False
    assert [c.url for c in s.receive_channels] == ["http://127.0.0.1:25900/gwcore/"]


def test_environment_and_precedence():
    env = {"GWCORE_ENDPOINT": "RemoteSite", "GWCORE_COMMIT_MAX_BATCH": "64", "GWCORE_DEDUP_TTL": "12h",
           "GWCORE_MAX_BODY": "1MiB", "GWCORE_HTTP_ALLOW_GET": "yes",
           "GWCORE_RECEIVE_CHANNELS": "http://+:25900/RemoteSite/, http://127.0.0.1:25901/Other"}
    s = Settings.from_env(env)
    assert (s.endpoint, s.commit_max_batch, s.dedup_ttl, s.max_body, s.http_allow_get) == \
        ("RemoteSite", 64, 43200.0, 1 << 20, True)
    assert s.receive_channels[0] == ReceiveChannel("http://+:25900/RemoteSite/", "0.0.0.0", 25900, "/RemoteSite/")
    assert s.receive_channels[1].path == "/Other/"
    # an explicit argument beats the environment
    assert Settings.from_env(env, commit_max_batch=8).commit_max_batch == 8


@pytest.mark.parametrize("name,value,message", [
    ("GWCORE_COMMIT_MAX_BATCH", "0", "GWCORE_COMMIT_MAX_BATCH='0' is invalid: must be a positive integer, got 0"),
    ("GWCORE_COMMIT_MAX_BATCH", "many",
     "GWCORE_COMMIT_MAX_BATCH='many' is invalid: invalid literal for int() with base 10: 'many'"),
    ("GWCORE_DEDUP_TTL", "soon",
     "GWCORE_DEDUP_TTL='soon' is invalid: not a duration: 'soon' (examples: 30s, 250ms, 15m, 12h, 7d)"),
    ("GWCORE_MAX_BODY", "-1", "GWCORE_MAX_BODY='-1' is invalid: not a size: '-1' (examples: 65536, 512k, 64MiB, 2G)"),
    ("GWCORE_STORE_SYNC", "maybe",
     "GWCORE_STORE_SYNC='maybe' is invalid: not a boolean: 'maybe' (use 1/0, true/false, yes/no)"),
    ("GWCORE_MODE", "cluster",
     "GWCORE_MODE='cluster' is invalid: 'cluster' is not one of standalone, distributor, selected"),
    ("GWCORE_RECEIVE_CHANNELS", "https://x:1/A/",
     "GWCORE_RECEIVE_CHANNELS: 'https://x:1/A/' is https:// and needs GWCORE_TLS_CERT and GWCORE_TLS_KEY"),
    ("GWCORE_RECEIVE_CHANNELS", "http://x:notaport/A/",
     "GWCORE_RECEIVE_CHANNELS is invalid: Port could not be cast to integer value as 'notaport'"),
    ("GWCORE_HANDLER", "nocolon", "GWCORE_HANDLER='nocolon' is invalid: 'nocolon' is not of the form module:function"),
    ("GWCORE_LOOP", "trio", "GWCORE_LOOP='trio' is invalid: 'trio' is not one of auto, uvloop, asyncio"),
    ("GWCORE_ENDPOINT", " ", "GWCORE_ENDPOINT must not be empty: it names the endpoint and its dedup scope"),
    ("GWCORE_STORE_MAP_SIZE", "128GiB",
     "GWCORE_STORE_MAP_SIZE (137438953472) is larger than GWCORE_STORE_MAX_SIZE (68719476736)"),
    ("GWCORE_ACK", "later", "GWCORE_ACK='later' is invalid: 'later' is not one of dispatched, stored"),
    ("GWCORE_AMQP_URL", "http://x/",
     "GWCORE_AMQP_URL='http://x/' is invalid: 'http://x/' is not an amqp:// or amqps:// URL"),
    ("GWCORE_INSTANCE", "a b",
     "GWCORE_INSTANCE='a b' is invalid: 'a b': use letters, digits, '.', '_' and '-' (it names a queue)"),
    ("GWCORE_ELECTION_INTERVAL", "0", "GWCORE_ELECTION_INTERVAL='0' is invalid: must be greater than zero"),
    ("GWCORE_TRANSPORT", "mssql",
     "GWCORE_TRANSPORT='mssql' is invalid: 'mssql' is not one of rabbitmq, postgresql"),
    ("GWCORE_PG_DSN", "mysql://u:pw@db/x",
     "GWCORE_PG_DSN='mysql://u:pw@db/x' is invalid: 'mysql://u@db/x' is not a postgresql:// URL"),
    ("GWCORE_PG_SCHEMA", "My-Schema",
     "GWCORE_PG_SCHEMA='My-Schema' is invalid: 'My-Schema': use lower-case letters, digits and '_' "
     "(at most 63, not a digit first)"),
    ("GWCORE_PG_INSTANCE_EXPIRY", "30s",
     "GWCORE_PG_INSTANCE_EXPIRY='30s' is invalid: must be at least 60s: every instance renews its heartbeat every 5s, "
     "and the reply table of one not seen for this long is dropped"),
    ("GWCORE_PG_INSTANCE_EXPIRY", "never",
     "GWCORE_PG_INSTANCE_EXPIRY='never' is invalid: not a duration: 'never' (examples: 30s, 250ms, 15m, 12h, 7d)"),
    ("GWCORE_HTTP_MIN_RATE", "0/s", "GWCORE_HTTP_MIN_RATE='0/s' is invalid: must be greater than zero"),
    ("GWCORE_HTTP_MIN_RATE", "fast",
     "GWCORE_HTTP_MIN_RATE='fast' is invalid: not a rate: 'fast' (examples: 65536, 64KiB/s, 1MiB/s)"),
    ("GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER", "0",
     "GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER='0' is invalid: must be a positive integer, got 0"),
    ("GWCORE_HTTP_MAX_PARTS_PER_PEER", "-2",
     "GWCORE_HTTP_MAX_PARTS_PER_PEER='-2' is invalid: must be a positive integer, got -2"),
])
def test_invalid_values_name_the_variable(name, value, message):
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({name: value})
    assert str(info.value) == message


def test_unknown_variable_is_refused():
    with pytest.raises(ConfigurationError, match="GWCORE_COMIT_MAX_BATCH"):
        Settings.from_env({"GWCORE_COMIT_MAX_BATCH": "1"})


def test_channels_sharing_port_and_path_are_refused():
    with pytest.raises(ConfigurationError, match="share port"):
        Settings.from_env({"GWCORE_RECEIVE_CHANNELS": "http://127.0.0.1:1/A/,http://localhost:1/A/"})


def test_units():
    assert parse_duration("250ms") == 0.25 and parse_duration("7d") == 604800 and parse_duration("30") == 30
    assert parse_size("512k") == 512 << 10 and parse_size("2G") == 2 << 30 and parse_size("10") == 10
    with pytest.raises(ValueError, match=r"^not a size: '1\.5G' \(examples: 65536, 512k, 64MiB, 2G\)$"):
        parse_size("1.5G")


def test_client_limits():
    s = Settings.from_env({})
    assert (s.http_min_rate, s.http_max_connections_per_peer, s.http_max_parts_per_peer) == (64 << 10, 256, 16)
    for text, rate in (("64KiB/s", 64 << 10), ("1MiB/s", 1 << 20), ("1000", 1000), (" 2k /s ", 2048)):
        assert Settings.from_env({"GWCORE_HTTP_MIN_RATE": text}).http_min_rate == rate, text


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'endpoint'"):
        s.endpoint = "x"  # type: ignore[misc]
    assert s.endpoint == "gwcore"


def test_every_default_parses():
    # the defaults go through the same parsers as user values, and come out as the defaults
    given = {k: v for k, v in variables().items() if v}
    assert "GWCORE_MAX_BODY" in given and "GWCORE_DEDUP_TTL" in given
    assert Settings.from_env(given) == Settings.from_env({})


def test_channel_ports():
    from gwcore.config import ReceiveChannel

    assert ReceiveChannel.parse("http://127.0.0.1:0/RemoteSite/").port == 0   # ephemeral, not 80
    assert ReceiveChannel.parse("http://localhost/RemoteSite/").port == 80
    assert ReceiveChannel.parse("http://+:25900/RemoteSite/").host == "0.0.0.0"
    assert ReceiveChannel.parse("http://*/RemoteSite/").port == 80


def test_sites_from_the_environment_and_retry_delays():
    s = Settings.from_env({"GWCORE_SITES": "RemoteSite=http://10.0.0.2:25900/RemoteSite/, HQ=https://hq.example/HQ/",
                           "GWCORE_RETRY_DELAYS": "1s,2s", "GWCORE_RETRIES": "5"})
    assert [(x.key, x.url, x.concurrency, x.secret) for x in s.sites] == [
        ("RemoteSite", "http://10.0.0.2:25900/RemoteSite/", 8, None), ("HQ", "https://hq.example/HQ/", 8, None)]
    assert s.site("HQ").url == "https://hq.example/HQ/" and s.site("Nope") is None
    assert [s.retry_delay(n) for n in (1, 2, 3, 5)] == [1.0, 2.0, 2.0, 2.0]
    assert s.reply_uri == "http://127.0.0.1:25900/gwcore/"


@pytest.mark.parametrize("env,needle", [
    ({"GWCORE_SITES": "NoUrl"}, "GWCORE_SITES"),
    ({"GWCORE_SITES": "A=ftp://x/A/"}, "GWCORE_SITES"),
    ({"GWCORE_RETRY_DELAYS": ""}, "GWCORE_RETRY_DELAYS"),
    ({"GWCORE_REPLY_TO_URI": "http://+:25900/A/"}, "GWCORE_REPLY_TO_URI"),
    ({"GWCORE_SITES": "A=http://x/A/", "GWCORE_RECEIVE_CHANNELS": "http://+:25900/Me/"}, "GWCORE_REPLY_TO_URI"),
    ({"GWCORE_CONFIG": "/nonexistent/gwcore.toml"}, "GWCORE_CONFIG"),
    ({"GWCORE_TLS_CERT": __file__}, "GWCORE_TLS_KEY"),
])
def test_sending_settings_name_the_variable(env, needle):
    with pytest.raises(ConfigurationError, match=needle):
        Settings.from_env(env)


def test_config_file_sites_and_receive_keys(tmp_path):
    secret_file = tmp_path / "remote.secret"
    secret_file.write_bytes(b"0123456789abcdef-remote\n")
    cfg = tmp_path / "gwcore.toml"
    cfg.write_text(f"""
[sites.RemoteSite]
url = "https://remote.example/RemoteSite/"
concurrency = 3
secret = "0123456789abcdef-ours"
key_id = "HQ"

[sites.Other]
url = "http://other/Other/"

[receive.keys]
RemoteSite = {{ secret_file = "{secret_file}" }}
""")
    s = Settings.from_env({"GWCORE_CONFIG": str(cfg), "GWCORE_SITES": "Other=http://override/Other/"})
    remote = s.site("RemoteSite")
    assert (remote.concurrency, remote.secret, remote.key_id) == (3, b"0123456789abcdef-ours", "HQ")
    assert s.site("Other").url == "http://override/Other/"
    assert s.receive_keys == (("RemoteSite", b"0123456789abcdef-remote"),) and s.allow_unsigned is False
    assert "0123456789abcdef" not in repr(s)


def test_receive_keys_given_as_an_argument_refuse_unsigned_by_default():
    keys = (("hq", b"0123456789abcdef-hq"),)
    assert Settings.from_env({}, receive_keys=keys).allow_unsigned is False
    assert Settings.from_env({}, receive_keys=keys, allow_unsigned=True).allow_unsigned is True
    assert Settings.from_env({}, receive_keys=()).allow_unsigned is True


@pytest.mark.parametrize("text,needle", [
    ("[sites.A]\nurl = 'http://a/A/'\nsecret = 'short'\n", "at least 16 bytes"),
    ("[sites.A]\nurl = 'http://a/A/'\ncolour = 'red'\n", "unknown keys colour"),
    ("[sites.A]\nconcurrency = 2\n", "has no url"),
    ("[listeners]\n", "unknown tables listeners"),
    ("[sites.A\n", "not valid TOML"),
])
def test_config_file_errors(tmp_path, text, needle):
    cfg = tmp_path / "gwcore.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigurationError, match=needle):
        Settings.from_env({"GWCORE_CONFIG": str(cfg)})


def test_child_environment_holds_only_the_given_settings(monkeypatch):
    from gwcore.config import child_environment

    monkeypatch.setenv("GWCORE_DATA_DIR", "/from/the/shell")
    monkeypatch.setenv("GWCORE_NOT_A_SETTING", "x")
    monkeypatch.setenv("DEMO_UNRELATED", "kept")
    env = child_environment({"GWCORE_ENDPOINT": "RemoteSite"})
    assert {k: v for k, v in env.items() if k.startswith("GWCORE_")} == {"GWCORE_ENDPOINT": "RemoteSite"}
    assert env["DEMO_UNRELATED"] == "kept"
    with pytest.raises(ConfigurationError, match="GWCORE_ENDPIONT"):
        child_environment({"GWCORE_ENDPIONT": "typo"})


def test_selected_mode_settings():
    s = Settings.from_env({"GWCORE_MODE": "selected", "GWCORE_ACK": "stored", "GWCORE_AMQP_PREFETCH": "8",
                           "GWCORE_AMQP_URL": "amqp://u:secret@broker:5672/vh", "GWCORE_INSTANCE": "node-1",
                           "GWCORE_ELECTION_INTERVAL": "100ms"})
    assert (s.mode, s.ack, s.amqp_prefetch, s.instance, s.election_interval) == ("selected", "stored", 8, "node-1", 0.1)
    assert "secret" not in repr(s)
    assert Settings.from_env({}).ack == "dispatched"
    with pytest.raises(ConfigurationError, match="GWCORE_HA=on"):
        Settings.from_env({"GWCORE_MODE": "selected", "GWCORE_HA": "on"})


def test_selected_mode_on_postgresql_settings():
    s = Settings.from_env({"GWCORE_MODE": "selected", "GWCORE_TRANSPORT": "postgresql",
                           "GWCORE_PG_DSN": "postgresql://gw:secret@db:5432/nsb?sslmode=require",
                           "GWCORE_PG_SCHEMA": "sales_2", "GWCORE_PG_INSTANCE_EXPIRY": "90m"})
    assert (s.transport, s.pg_dsn, s.pg_schema) == ("postgresql", "postgresql://gw:secret@db:5432/nsb?sslmode=require",
                                                    "sales_2")
    assert s.pg_instance_expiry == 5400
    assert "secret" not in repr(s)
    default = Settings.from_env({})
    assert (default.transport, default.pg_schema, default.pg_instance_expiry) == ("rabbitmq", "public", 3600)
    # the shortest expiry is many heartbeats long: a live instance is never taken for gone
    assert Settings.from_env({"GWCORE_PG_INSTANCE_EXPIRY": "60"}).pg_instance_expiry == 60
    assert PG_INSTANCE_EXPIRY_MIN >= 10 * PG_HEARTBEAT


def test_several_broker_urls_one_per_cluster_node():
    urls = "amqp://u:p@rmq1:5672/vh, amqps://u:p@rmq2:5671/vh,amqp://u:p@rmq3/vh?heartbeat=10"
    s = Settings.from_env({"GWCORE_AMQP_URL": urls})
    assert s.amqp_urls == ("amqp://u:p@rmq1:5672/vh", "amqps://u:p@rmq2:5671/vh", "amqp://u:p@rmq3/vh?heartbeat=10")
    assert s.amqp_url == ",".join(s.amqp_urls)
    assert Settings.from_env({}).amqp_urls == ("amqp://guest:guest@127.0.0.1:5672/",)
    # an override is taken as it is given: one URL, or several
    assert Settings.from_env({}, amqp_url="amqp://a/,amqp://b/").amqp_urls == ("amqp://a/", "amqp://b/")
    # "" and "/" are both the default virtual host
    assert Settings.from_env({"GWCORE_AMQP_URL": "amqp://a,amqp://b/"}).amqp_urls == ("amqp://a", "amqp://b/")


@pytest.mark.parametrize("value, message", [
    ("amqp://a/, http://b/", "'http://b/' is not an amqp:// or amqps:// URL"),
    ("amqp://a/,amqp://u:secret@b:x/", "'amqp://u@b:x/': Port could not be cast to integer value as 'x'"),
    ("amqp://a/one,amqp://b/two", "the nodes of one cluster are on one virtual host, not 'one' and 'two'"),
    ("amqp://a/,amqp://a/", "a URL is listed twice"),
    (" , ", "give at least one amqp:// or amqps:// URL"),
])
def test_invalid_broker_url_lists(value, message):
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({"GWCORE_AMQP_URL": value})
    assert message in str(err.value)
    assert "secret" not in str(err.value).split("is invalid:")[1]
