"""Who a request comes from when it comes through a reverse proxy.

A proxy that terminates TLS or balances load is the peer of every request it passes on,
so a budget per peer address would be one budget for all its clients. A proxy appends
the address it saw to `X-Forwarded-For`; the client can put anything before that. So
the header is read from the right, past the proxies we trust, and the first address
they did not add is the client's: the one the nearest trusted proxy saw. Without a
trusted peer the header is ignored, since anyone can send it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    """`[server] trusted_proxies` as networks (an address is a network of one)."""
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(peer: str | None, forwarded_for: Sequence[str],
                   trusted: Sequence[Network]) -> str | None:
    """The client's address: `peer` unless it is a trusted proxy, else the right-most
    address of the `X-Forwarded-For` values (`forwarded_for`, in header order) that is
    not one. An entry that is not an address stops the walk at the proxy that passed it
    on, whose address is returned: a forged value never becomes a budget of its own."""
    if peer is None or not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    last = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return last
        if not _trusted(hop, trusted):
            return hop
        last = hop
    return last            # every hop a trusted proxy: the farthest one is the client
