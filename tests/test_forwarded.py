"""The client's address behind trusted reverse proxies (`service.forwarded`), from
`X-Forwarded-For` or `Forwarded` as configured, and the per-address quote budget of a
real server behind one."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from service.config import load
from service.forwarded import budget_key, client_address, networks
from tests.conftest import ServerProcess

PROXIES = networks(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"])


@pytest.mark.parametrize(("peer", "header", "client"), [
    ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),     # not a proxy: header ignored
    ("10.0.0.1", [], "10.0.0.1"),                          # a proxy that sent no header
    ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
    ("10.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client's own prefix
    ("10.0.0.1", ["6.6.6.6", "198.51.100.1, 10.2.3.4"], "198.51.100.1"),  # two proxies
    ("192.0.2.1", ["198.51.100.1 , 192.0.2.1"], "198.51.100.1"),
    ("10.0.0.1", ["10.9.9.9, 10.0.0.2"], "10.9.9.9"),      # all trusted: the farthest
    ("10.0.0.1", ["198.51.100.1, not-an-address"], "10.0.0.1"),  # forged: the proxy
    ("10.0.0.1", ["garbage, 10.0.0.2"], "10.0.0.2"),
    ("2001:db8::1", ["2001:db9::5"], "2001:db9::5"),
    (None, ["198.51.100.1"], None),
    # as dual-stack sockets and load balancers write them
    ("::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
    ("::ffff:203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
    ("10.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
    ("10.0.0.1", ["[2001:db9::5]:443"], "2001:db9::5"),
    ("10.0.0.1", ["::FFFF:198.51.100.1, 10.0.0.2:80"], "198.51.100.1"),
    ("10.0.0.1", ["2001:DB9:0::5"], "2001:db9::5"),
])
def test_the_client_is_the_last_address_no_trusted_proxy_added(
        peer: str | None, header: list[str], client: str | None) -> None:
    assert client_address(peer, header, PROXIES) == client


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("10.0.0.1", ["198.51.100.1"], ()) == "10.0.0.1"
    assert client_address("10.0.0.1", ["for=198.51.100.1"], (), "forwarded") == "10.0.0.1"


@pytest.mark.parametrize(("peer", "header", "client"), [
    ("203.0.113.7", ["for=198.51.100.1"], "203.0.113.7"),  # not a proxy: header ignored
    ("10.0.0.1", [], "10.0.0.1"),
    ("10.0.0.1", ["for=198.51.100.1"], "198.51.100.1"),
    ("10.0.0.1", ['for="198.51.100.1"'], "198.51.100.1"),             # a quoted string
    ("10.0.0.1", ['for="198.51.100.\\1"'], "198.51.100.1"),          # ... escaped
    ("10.0.0.1", ['for="[2001:db9::5]:4711"'], "2001:db9::5"),        # IPv6 and port
    ("10.0.0.1", ["For=198.51.100.1"], "198.51.100.1"),               # names: any case
    ("10.0.0.1", ["by=10.0.0.1;FOR=198.51.100.1;proto=https"], "198.51.100.1"),
    ("10.0.0.1", [" for=198.51.100.1 ; proto=https "], "198.51.100.1"),
    # a quote, escaped or not, and a comma inside quoted strings of another parameter
    ("10.0.0.1", ['for=198.51.100.1;host="a\\",b"'], "198.51.100.1"),
    ("10.0.0.1", ['for=198.51.100.1;host="a\\\\"'], "198.51.100.1"),
    ("10.0.0.1", ["for=6.6.6.6, for=198.51.100.1"], "198.51.100.1"),  # the client's own
    ("10.0.0.1", ["for=198.51.100.1, for=10.2.3.4"], "198.51.100.1"),  # two proxies
    ("10.0.0.1", ["for=6.6.6.6", "for=198.51.100.1, for=10.2.3.4"], "198.51.100.1"),
    ("10.0.0.1", ["for=198.51.100.1", "for=10.2.3.4;proto=http"], "198.51.100.1"),
    ("10.0.0.1", ["for=10.9.9.9, for=10.0.0.2"], "10.9.9.9"),  # all trusted: the farthest
    # what the client wrote before the proxy's element, however broken, is not read
    ("10.0.0.1", ['for="6.6.6.6, for=198.51.100.1'], "198.51.100.1"),
    ("10.0.0.1", ['for="6.6.6.6, for="[2001:db9::5]:4711"'], "2001:db9::5"),
    ("10.0.0.1", ["garbage", "for=198.51.100.1"], "198.51.100.1"),
    # no address: the walk stops at the proxy that passed it on
    ("10.0.0.1", ["for=198.51.100.1, for=unknown"], "10.0.0.1"),
    ("10.0.0.1", ["for=6.6.6.6, for=_hidden, for=10.0.0.2"], "10.0.0.2"),
    ("10.0.0.1", ["for=6.6.6.6, proto=https;by=10.0.0.1"], "10.0.0.1"),
    ("10.0.0.1", ["for=6.6.6.6, , for=10.0.0.2"], "10.0.0.2"),
    ("10.0.0.1", ["for=6.6.6.6, garbage, for=10.0.0.2"], "10.0.0.2"),
    ("10.0.0.1", ["for=6.6.6.6", "garbage"], "10.0.0.1"),
    ("10.0.0.1", ["for=6.6.6.6;for=198.51.100.1"], "10.0.0.1"),      # a name twice
    ("10.0.0.1", ["for=198.51.100.1:4711"], "10.0.0.1"),    # a port needs the quotes
    ("10.0.0.1", ['for="198.51.100.1'], "10.0.0.1"),
    ("10.0.0.1", ['for="198.51.100.1\\"'], "10.0.0.1"),     # its closing quote escaped
    ("10.0.0.1", ["for=198.51.100.1 proto=https"], "10.0.0.1"),
    ("10.0.0.1", ["198.51.100.1"], "10.0.0.1"),            # X-Forwarded-For's syntax
])
def test_from_forwarded_the_client_is_the_last_for_no_trusted_proxy_added(
        peer: str | None, header: list[str], client: str | None) -> None:
    assert client_address(peer, header, PROXIES, "forwarded") == client


@pytest.mark.parametrize(("address", "key"), [
    ("198.51.100.1", "198.51.100.1"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),     # the same /64
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),                       # the next one
    ("::ffff:198.51.100.1", "198.51.100.1"),
    ("unix-socket", "unix-socket"),
    (None, None),
])
def test_an_ipv6_client_has_one_budget_per_64(address: str | None, key: str | None) -> None:
    assert budget_key(address) == key


def test_the_setting_is_checked_and_read_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[server]\ntrusted_proxies = ["10.0.0.0/8", "nonsense"]\n')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.server\.trusted_proxies\[1\]"):
        load(path, {})
    path.write_text("")
    cfg = load(path, {"MATCHER_SERVER_TRUSTED_PROXIES": "10.0.0.1, 192.0.2.0/24"})
    assert cfg.server.trusted_proxies == ["10.0.0.1", "192.0.2.0/24"]
    assert load(path, {}).server.trusted_proxies == []


def test_the_forwarded_header_is_one_of_two_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[server]\nforwarded_header = "both"\n')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.server\.forwarded_header"):
        load(path, {})
    path.write_text("")
    with pytest.raises(msgspec.ValidationError,
                       match=r"`\$\.server\.forwarded_header` \(set by the environment "
                             r"variable MATCHER_SERVER_FORWARDED_HEADER\)"):
        load(path, {"MATCHER_SERVER_FORWARDED_HEADER": "X-Forwarded-For, Forwarded"})
    assert load(path, {}).server.forwarded_header == "x-forwarded-for"
    cfg = load(path, {"MATCHER_SERVER_FORWARDED_HEADER": "forwarded"})
    assert cfg.server.forwarded_header == "forwarded"


def quote(server: ServerProcess, forwarded_for: str | None,
          header: str = "X-Forwarded-For") -> int:
    req = urllib.request.Request(f"{server.http}/v1/segments/DFM-90D/quote?amount=500000",
                                 headers={header: forwarded_for} if forwarded_for else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["type"] == "quote"
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_behind_a_trusted_proxy_each_client_has_its_own_quote_budget(
        start_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHER_SERVER_TRUSTED_PROXIES", "127.0.0.1")
    server = start_server(rate=0.5, burst=2)
    assert [quote(server, "198.51.100.1") for _ in range(3)] == [200, 200, 429]
    assert quote(server, "6.6.6.6, 198.51.100.1") == 429       # a prefix changes nothing
    assert quote(server, "198.51.100.2") == 200                # another client
    # An IPv6 client cannot take a fresh budget from each address of its /64.
    assert [quote(server, f"2001:db8:0:1::{i}") for i in range(3)] == [200, 200, 429]
    assert quote(server, "2001:db8:0:2::1") == 200
    assert [quote(server, None) for _ in range(3)] == [200, 200, 429]   # the proxy itself


def test_an_untrusted_peer_cannot_escape_its_budget_with_the_header(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(rate=0.5, burst=2)
    assert [quote(server, f"198.51.100.{i}") for i in range(3)] == [200, 200, 429]


@pytest.mark.parametrize(("setting", "read", "ignored"), [
    ("x-forwarded-for", ("X-Forwarded-For", "198.51.100.9"), ("Forwarded", "for=198.51.100.{}")),
    ("forwarded", ("Forwarded", 'for="[2001:db8:0:9::1]:4711"'),
     ("X-Forwarded-For", "198.51.100.{}")),
])
def test_behind_a_trusted_proxy_only_the_configured_header_is_read(
        start_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch,
        setting: str, read: tuple[str, str], ignored: tuple[str, str]) -> None:
    """A proxy that appends to one header passes the other on as the client wrote it:
    read, it would give the client a fresh budget with each address it wrote there."""
    monkeypatch.setenv("MATCHER_SERVER_TRUSTED_PROXIES", "127.0.0.1")
    monkeypatch.setenv("MATCHER_SERVER_FORWARDED_HEADER", setting)
    server = start_server(rate=0.5, burst=2)
    name, value = ignored
    assert [quote(server, value.format(i), name) for i in range(3)] == [200, 200, 429]
    name, value = read                   # the proxy's budget is spent; the client's is not
    assert [quote(server, value, name) for _ in range(3)] == [200, 200, 429]
