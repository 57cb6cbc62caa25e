"""Who a request comes from when it comes through a reverse proxy.

A proxy that terminates TLS or balances load is the peer of every request it passes on,
so a budget per peer address would be one budget for all its clients. A proxy appends
the address it saw to `X-Forwarded-For`; the client can put anything before that. So
the header is read from the right, past the proxies we trust, and the first address
they did not add is the client's: the one the nearest trusted proxy saw. Without a
trusted peer the header is ignored, since anyone can send it. So list the proxies'
own addresses, not the networks their clients are in: a client inside a listed network
that reaches the service directly could write its own header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def client_address(peer: str | None, forwarded_for: Sequence[str],
                   trusted: Sequence[Network]) -> str | None:
    """The client's address: `peer` unless it is a trusted proxy, else the right-most
    address of the `X-Forwarded-For` values (`forwarded_for`, in header order) that is
    not one, written as `ipaddress` writes it (one budget per address, however spelt).
    An entry that is not an address stops the walk at the proxy that passed it on, whose
    address is returned: a forged value never becomes a budget of its own."""
    ip = parse(peer) if peer is not None else None
    if ip is None:
        return peer
    if not _trusted(ip, trusted):
        return str(ip)
    last = ip
    for value in reversed(forwarded_for):
        for text in reversed(value.split(",")):
            hop = parse(text)
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
