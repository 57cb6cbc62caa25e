"""Who may do what: participants, their roles, and how an API key finds one.

Keys are never stored, only their SHA-256; a key is checked by hashing it and looking
the hash up, so the directory holds nothing that would let anyone sign in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from msgspec import Struct

from matcher.protocol import (
    AddSegment,
    Amend,
    Ask,
    Bid,
    Cancel,
    CancelAll,
    EndOfDay,
    Halt,
    QuoteRequest,
    Reinstate,
    Reopen,
    Repay,
    Resume,
    Role,
    SetCreditLine,
    Skip,
    StatusRequest,
    Subscribe,
    Suspend,
    Unsubscribe,
)

#: The participant id the gateway itself uses for commands it issues (the end-of-day
#: cut-off, cancel on disconnect is issued as the funder). No key signs in as it.
SYSTEM = 0

_READ = {QuoteRequest, StatusRequest, Subscribe, Unsubscribe}
ALLOWED: dict[Role, frozenset[type]] = {
    "funder": frozenset({Bid, Amend, Cancel, CancelAll, SetCreditLine, *_READ}),
    "sme": frozenset({Ask, Cancel, CancelAll, *_READ}),
    "platform": frozenset({Repay, *_READ}),
    # Resume and Skip: the gateway's own (no client sends them).
    "admin": frozenset({AddSegment, Halt, Reopen, Suspend, Reinstate, EndOfDay, Resume,
                        Skip, *_READ}),
}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Participant(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A funder, an SME, the platform or an admin. `key_sha256` is the hashed API key."""

    id: int
    name: str
    role: Role
    key_sha256: str
    cancel_on_disconnect: bool = True

    def __repr__(self) -> str:   # keep even the hash out of logs
        return f"Participant(id={self.id}, name={self.name!r}, role={self.role!r})"

    def may(self, message: object) -> bool:
        return type(message) in ALLOWED[self.role]


class Directory:
    """All participants, found by id or by API key."""

    def __init__(self, participants: list[Participant]) -> None:
        self._by_id: dict[int, Participant] = {}
        self._by_hash: dict[str, Participant] = {}
        for p in participants:
            if p.id == SYSTEM or p.id in self._by_id:
                raise ValueError(f"participants: id {p.id} is reserved or used twice")
            if p.key_sha256 in self._by_hash:
                raise ValueError(f"participants: {p.name} shares an API key with another")
            self._by_id[p.id] = p
            self._by_hash[p.key_sha256] = p

    def authenticate(self, key: str) -> Participant | None:
        return self._by_hash.get(hash_key(key))

    def get(self, participant: int) -> Participant | None:
        return self._by_id.get(participant)

    def name(self, participant: int) -> str:
        p = self._by_id.get(participant)
        return p.name if p else str(participant)

    def __iter__(self) -> Iterator[Participant]:
        return iter(self._by_id.values())
