"""Who a request comes from when it comes through a reverse proxy.

A proxy that terminates TLS or balances load is the peer of every request it passes on,
so a budget per peer address would be one budget for all its clients. A proxy appends
the address it saw to `X-Forwarded-For`, or as the `for=` of an element of RFC 7239's
`Forwarded` (`[server] forwarded_header` says which); the client can put anything before
that. So the header's hops are read from the right, past the proxies we trust, and the
first address they did not add is the client's: the one the nearest trusted proxy saw.
Both headers give a list of hops to the one walk. Without a trusted peer the header is
ignored, since anyone can send it. So list the proxies' own addresses, not the networks
their clients are in: a client inside a listed network that reaches the service
directly could write its own header.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: The header a deployment's proxies append to (`[server] forwarded_header`). One, never
#: both: a proxy that appends to one passes the other on as the client wrote it.
Header = Literal["x-forwarded-for", "forwarded"]

#: What a token (a name, or a value without quotes) is made of: RFC 9110's tchar.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    """`[server] trusted_proxies` as networks (an address is a network of one)."""
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def parse(text: str) -> Address | None:
    """An address as a peer or a proxy writes it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
    `[2001:db8::1]:5678`; an IPv4 address mapped into IPv6 (a dual-stack socket's
    `::ffff:1.2.3.4`) as the IPv4 one. None for anything else."""
    text = text.strip()
    if text.startswith("["):                                 # [v6] or [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:                                # v4:port
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


def _trusted(ip: Address, trusted: Sequence[Network]) -> bool:
    return any(ip in net for net in trusted)


def _x_forwarded_for(values: Sequence[str]) -> Iterator[Address | None]:
    """`X-Forwarded-For`'s hops, nearest first: comma-separated addresses."""
    for value in reversed(values):
        for text in reversed(value.split(",")):
            yield parse(text)


def _forwarded(values: Sequence[str]) -> Iterator[Address | None]:
    """`Forwarded`'s hops, nearest first: each element's `for=`; None for an element
    without one, or whose `for=` is `unknown` or obfuscated (`_hidden`): not an address."""
    for value in reversed(values):
        for node in _for_values(value):
            yield parse(node) if node is not None else None


def _for_values(line: str) -> Iterator[str | None]:
    """The `for=` of each element of one `Forwarded` line, from the right; None for an
    element without one, and for the first that does not parse, left of which nothing
    is read. From the right, because that is where a proxy appends: its element is read
    as it wrote it whatever the client wrote before it (read from the left, a quote the
    client left open would swallow it)."""
    end = len(line)
    while True:
        element = _element(line, end)
        if element is None:
            yield None
            return
        pairs, comma = element
        yield pairs.get("for")
        if comma < 0:
            return
        end = comma


def _element(line: str, end: int) -> tuple[dict[str, str], int] | None:
    """The `name=value` pairs (names in lower case) of the element of `line` that ends
    at `end`, and the index of the comma before it (-1 at the start of the line); None
    if it does not parse, or names a parameter twice (RFC 7239 forbids it, and which one
    a proxy meant is a guess)."""
    pairs: dict[str, str] = {}
    i, separated = end, True
    while True:
        while i > 0 and line[i - 1] in " \t":
            i -= 1
        if i == 0 or line[i - 1] == ",":
            return pairs, i - 1
        if line[i - 1] == ";":
            i, separated = i - 1, True
            continue
        pair = _pair(line, i) if separated else None
        if pair is None:
            return None
        name, value, i = pair
        if name in pairs:
            return None
        pairs[name] = value
        separated = False


def _pair(line: str, end: int) -> tuple[str, str, int] | None:
    """The `name=value` of `line` that ends at `end` (the value a token or a quoted
    string, unescaped), and where it starts; None if there is none."""
    if line[end - 1] == '"':
        start = _opening_quote(line, end - 1)
        if start is None:
            return None
        value = _QUOTED_PAIR.sub(r"\1", line[start + 1:end - 1])
    else:
        start = _token_start(line, end)
        value = line[start:end]
    if start in (0, end) or line[start - 1] != "=":
        return None
    name = _token_start(line, start - 1)
    if name == start - 1:
        return None
    return line[name:start - 1].lower(), value, name


def _token_start(line: str, end: int) -> int:
    while end > 0 and line[end - 1] in _TCHAR:
        end -= 1
    return end


def _opening_quote(line: str, close: int) -> int | None:
    """Where the quoted string that `line[close]` closes opens: the nearest quote before
    it that no backslash escapes. None if `line[close]` is escaped itself, or there is none."""
    if _escaped(line, close):
        return None
    for i in range(close - 1, -1, -1):
        if line[i] == '"' and not _escaped(line, i):
            return i
    return None


def _escaped(line: str, i: int) -> bool:
    """Whether `line[i]` follows an odd run of backslashes: each escapes the next."""
    run = 0
    while i - run > 0 and line[i - run - 1] == "\\":
        run += 1
    return run % 2 == 1


_HOPS: dict[Header, Callable[[Sequence[str]], Iterator[Address | None]]] = {
    "x-forwarded-for": _x_forwarded_for, "forwarded": _forwarded}


def client_address(peer: str | None, values: Sequence[str], trusted: Sequence[Network],
                   header: Header = "x-forwarded-for") -> str | None:
    """The client's address: `peer` unless it is a trusted proxy, else the right-most
    hop of `header`'s values (`values`, every line of it in order) that is not one,
    written as `ipaddress` writes it (one budget per address, however spelt). A hop that
    is not an address stops the walk at the proxy that passed it on, whose address is
    returned: a forged value never becomes a budget of its own."""
    ip = parse(peer) if peer is not None else None
    if ip is None:
        return peer
    if not _trusted(ip, trusted):
        return str(ip)
    last = ip
    for hop in _HOPS[header](values):
        if hop is None:
            return str(last)
        if not _trusted(hop, trusted):
            return str(hop)
        last = hop
    return str(last)       # every hop a trusted proxy: the farthest one is the client


def budget_key(address: str | None) -> str | None:
    """The key of `address`'s rate budget: the address itself for IPv4, its /64 for
    IPv6. A network gives each host, and each customer of an ISP, a /64 (RFC 6177)
    from which a client can take any number of addresses (privacy extensions make a new
    one every day), so a budget per IPv6 address would be as many budgets as the client
    cares to use."""
    ip = parse(address) if address is not None else None
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
