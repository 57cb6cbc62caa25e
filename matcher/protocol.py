"""Every message that crosses the engine's edge, as msgspec Structs: the wire format.

This module is the single source of truth for the protocol: the WebSocket speaks these
as JSON, the journal stores commands as MessagePack, docs/protocol.md and the AsyncAPI
document describe them (a test checks the three agree). Decoding validates every bound
the type can express (unknown fields, missing fields, ranges, lengths) and names the
JSON path of what is wrong; what depends on state (the segment's own rate cap, whose
order it is) the engine checks.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta, Struct

from matcher.types import MAX_AMOUNT, MAX_ID, MAX_LINE, MAX_REPAID, MAX_SEQ

#: The highest rate cap a segment may have (bps): 100% a year.
MAX_RATE_CAP = 10_000

Name = Annotated[str, Meta(min_length=1, max_length=64)]
"""A client id: any string of 1 to 64 characters, unique per participant."""
SegmentId = Annotated[str, Meta(min_length=1, max_length=32)]
"""A reference to a segment (or core enterprise): it must exist, so no pattern is needed,
and none is paid for on every order and every journal replay."""
CoreId = SegmentId
#: Patterns end in `(?!\n)$`: Python's `$` (msgspec matches with `re`) also matches
#: before a final newline, which JSON Schema's (ECMA) does not.
_NEW_ID = r"^[A-Za-z0-9_.-]+(?!\n)$"
NewId = Annotated[str, Meta(min_length=1, max_length=32, pattern=_NEW_ID)]
"""The id of a new segment or core enterprise: letters, digits, `_`, `.`, `-` (it appears
in URLs)."""
Amount = Annotated[int, Meta(ge=1, le=MAX_AMOUNT)]
Rate = Annotated[int, Meta(ge=0, le=MAX_RATE_CAP)]
MinTicket = Annotated[int, Meta(ge=0, le=MAX_AMOUNT)]
LineAmount = Annotated[int, Meta(ge=0, le=MAX_LINE)]
_TRADE_ID = r"^[0-9]{1,19}-[0-9]{1,19}(?!\n)$"
TradeId = Annotated[str, Meta(max_length=39, pattern=_TRADE_ID)]
"""A trade id, `"<seq>-<n>"` (also its fill-stream entry id); 19 digits each at most,
so that every one is a valid stream id and has a successor."""
#: The most fills one `fills` request may ask for: the gateway decodes a page on its
#: event loop (about 4 us a fill here), between other clients' messages.
MAX_FILLS_PAGE = 100
Tif = Literal["gtc", "day", "ioc", "fok"]
Role = Literal["funder", "sme", "platform", "admin"]


class _Message(Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True, gc=False):
    """Base of every message: tagged by `type`, strict about fields."""


# --- Commands: they change the market, so they are sequenced and journaled -------------


class Bid(_Message, tag="bid"):
    """A funder offers to lend up to `amount` fen at `rate_bps` in one segment."""

    client_id: Name
    segment: SegmentId
    rate_bps: Rate
    amount: Amount
    min_ticket: MinTicket = 0
    tif: Tif = "gtc"


class Ask(_Message, tag="ask"):
    """An SME asks to borrow `amount` fen at no more than `max_rate_bps` (null: any)."""

    client_id: Name
    segment: SegmentId
    amount: Amount
    max_rate_bps: Rate | None = None
    tif: Tif = "ioc"
    single_funder: bool = False


class Cancel(_Message, tag="cancel"):
    """Cancel one's own resting order, named by its client id."""

    client_id: Name


class CancelAll(_Message, tag="cancel_all"):
    """Cancel all of one's own resting orders, or all in one segment: a kill switch that
    is one command however many orders rest (and one journal entry)."""

    segment: SegmentId | None = None


class Amend(_Message, tag="amend"):
    """A funder changes its resting bid's rate and/or remaining amount."""

    client_id: Name
    rate_bps: Rate | None = None
    amount: Amount | None = None


class SetCreditLine(_Message, tag="set_credit_line"):
    """A funder sets its total line (fen) against one core enterprise."""

    core: CoreId
    amount: LineAmount


class Repay(_Message, tag="repay"):
    """The platform reports what SMEs' loans from `funder` against `core` have repaid so
    far, in total: the difference from the last report frees as much of the funder's
    line (ADR 24). A total, not an increment, so that a retry or a report overtaken by
    a later one changes nothing, with nothing to remember but one number per line."""

    funder: Annotated[int, Meta(ge=1, le=MAX_ID)]
    core: CoreId
    repaid_total: Annotated[int, Meta(ge=0, le=MAX_REPAID)]


class AddSegment(_Message, tag="add_segment"):
    """An admin opens a market: receivables of `core` with `tenor_days`."""

    segment: NewId
    core: NewId
    tenor_days: Annotated[int, Meta(ge=1, le=3660)]
    rate_cap_bps: Annotated[int, Meta(ge=1, le=MAX_RATE_CAP)] = 3600


class Halt(_Message, tag="halt"):
    """An admin stops trading in a segment at once, as when its core enterprise's
    receivables can no longer be financed (a credit event, a dispute): every order
    resting there ends (`done` reason `halted`), and new orders there are refused until
    `reopen` (ADR 25)."""

    segment: SegmentId


class Reopen(_Message, tag="reopen"):
    """An admin lets a halted segment trade again; it reopens empty."""

    segment: SegmentId


class Suspend(_Message, tag="suspend"):
    """An admin stops a participant from trading at once (a fraud investigation, a
    breach of the platform's rules): its resting orders end (`done` reason `suspended`),
    and its new orders are refused until `reinstate`. It may still read (ADR 26)."""

    participant: Annotated[int, Meta(ge=1, le=MAX_ID)]


class Reinstate(_Message, tag="reinstate"):
    """An admin lets a suspended participant place orders again."""

    participant: Annotated[int, Meta(ge=1, le=MAX_ID)]


class EndOfDay(_Message, tag="end_of_day"):
    """The same-day disbursement cut-off: DAY orders expire, GTC orders stay.

    `client_id` makes an admin's safe to send again: one that names the client id of
    the last end of day that had one is answered as a repeat and expires nothing.
    Without it, each one sent expires what rests as DAY by then, DAY orders placed since
    the one before too (an admin resending one after a lost answer expired them; found
    in an audit)."""

    client_id: Name | None = None

    # Whether orders that ended within the retry window keep answering retries after
    # the cut-off. The sequencer journals it true whatever a client sent; false in the
    # journals written before it existed, where every ended order was forgotten at the
    # cut-off (and an ask retried across it was a second loan): they replay that way.
    keep_retries: bool = False


class Resume(_Message, tag="resume"):
    """The gateway serves again after a stop: the time since the last command was
    downtime, not trading time (ADR 8 addendum). Issued by the gateway at every start;
    no client can send it (it is not a `ClientMessage`)."""


class Skip(_Message, tag="skip"):
    """The sequence numbers from this one up to `last` were given to commands that Redis
    acknowledged and then lost (the operator starts the gateway with `--lost-up-to`,
    ADR 29): the next command is `last + 1`. Order ids and trade ids are sequence
    numbers, and the lost ones are in the hands of funders, SMEs and the platform; none
    is given again to another order or loan. Issued by the gateway before any other
    command at a start, alone in its journal write; no client can send it."""

    last: Annotated[int, Meta(ge=1, le=MAX_SEQ)]


Command = (Bid | Ask | Cancel | CancelAll | Amend | SetCreditLine | Repay | AddSegment
           | Halt | Reopen | Suspend | Reinstate | EndOfDay | Resume | Skip)


# --- Requests that change nothing: answered at once, never journaled ----------------


class QuoteRequest(_Message, tag="quote"):
    """What an IOC ask of `amount` would get right now. `ref` is echoed back."""

    segment: SegmentId
    amount: Amount
    single_funder: bool = False
    ref: Name | None = None


class StatusRequest(_Message, tag="status"):
    """One's own resting orders and, for a funder, credit lines: answered with `status`.
    An admin may name another `participant` (what the runbook asks an operator to look
    at: a funder's lines, a suspended participant's orders)."""

    participant: Annotated[int, Meta(ge=1, le=MAX_ID)] | None = None


class FillsRequest(_Message, tag="fills"):
    """One's own fills from Redis, answered with `fills`: what a client that was away
    missed.

    With `after` (a trade id, `"0-0"` for the first of all), the next `limit` fills after
    it, oldest first; without, the newest `limit`, oldest first. Only journaled fills are
    listed; a fill can come both live and in a page, once each, with the same trade id.
    One page at a time per connection.
    """

    after: TradeId | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_FILLS_PAGE)] = 50
    ref: Name | None = None


class Auth(_Message, tag="auth"):
    """Authenticate a connection with an API key (for clients that cannot set headers)."""

    key: Annotated[str, Meta(min_length=1, max_length=256)]


class Subscribe(_Message, tag="subscribe"):
    """Receive `book` updates for these segments (and `fills` for the platform role).
    `ref` is echoed in its `subscribed` and its `error`s: a client that sent several
    can tell which one a refusal answers."""

    segments: Annotated[list[SegmentId], Meta(max_length=1000)] = []
    fills: bool = False
    ref: Name | None = None


class Unsubscribe(_Message, tag="unsubscribe"):
    """Stop `book` updates for these segments (and, with `fills`, the platform's trades).
    `ref` is echoed in its `error`s."""

    segments: Annotated[list[SegmentId], Meta(max_length=1000)] = []
    fills: bool = False
    ref: Name | None = None


ClientMessage = (
    Bid | Ask | Cancel | CancelAll | Amend | SetCreditLine | Repay | AddSegment | Halt
    | Reopen | Suspend | Reinstate | EndOfDay | QuoteRequest | StatusRequest | FillsRequest
    | Auth | Subscribe | Unsubscribe
)


# --- Events: what the engine and the gateway send -----------------------------------


class _Event(Struct, tag_field="type", kw_only=True, gc=False):
    pass


class Accepted(_Event, tag="accepted"):
    """The command is sequenced and journaled. `duplicate`: a retry of an earlier one."""

    client_id: str | None
    seq: int
    order_id: int | None = None
    duplicate: bool = False


class Rejected(_Event, tag="rejected"):
    """The command changed nothing. `code` is stable; `path` points into the message."""

    client_id: str | None
    code: str
    message: str
    path: str | None = None


class Fill(_Event, tag="fill"):
    """A loan: `funder` lends `amount` fen to `sme` at `rate_bps`, sent to both parties.

    `client_id` and `side` are the recipient's own order; `trade_id` is the same
    deterministic id the platform stream carries.
    """

    trade_id: str
    seq: int
    ts: int
    segment: str
    core: str
    tenor_days: int
    funder: int
    funder_name: str
    sme: int
    rate_bps: int
    amount: int
    side: Literal["bid", "ask"]
    client_id: str
    order_id: int


DoneReason = Literal["filled", "cancelled", "expired", "unfilled", "halted", "suspended"]


class Done(_Event, tag="done"):
    """An order has ended: nothing more will fill. `remaining` is what it gave up."""

    client_id: str
    order_id: int
    reason: DoneReason
    filled: int
    remaining: int


class Quote(_Event, tag="quote"):
    """The answer to a quote request; `fillable` 0 and null rates when nothing fills."""

    segment: str
    amount: int
    single_funder: bool
    fillable: int
    avg_rate_bps: float | None
    worst_rate_bps: int | None
    funders: int
    seq: int
    ref: str | None = None


class Level(Struct, array_like=True, frozen=True):
    """One rate level of the funder side: [rate_bps, amount, orders]."""

    rate_bps: int
    amount: int
    orders: int


class BookUpdate(_Event, tag="book"):
    """A segment's market as of `seq`: funder levels best first and resting demand.

    Levels count what funders can lend now, within their credit lines, so the amounts
    add up to what a market ask could get. Funder identities never appear here.
    """

    segment: str
    seq: int
    best_rate_bps: int | None
    levels: list[Level]
    demand_amount: int
    demand_orders: int
    last_fills: list[tuple[int, int]] = []      # [rate_bps, amount], newest first
    halted: bool = False                        # no orders until an admin reopens it


class OrderStatus(Struct, frozen=True, kw_only=True):
    client_id: str
    order_id: int
    segment: str
    side: Literal["bid", "ask"]
    rate_bps: int
    remaining: int
    filled: int
    tif: Tif
    min_ticket: int
    single_funder: bool = False       # an ask's: a retry rebuilt from here sends it too


class LineStatus(Struct, frozen=True, kw_only=True):
    """A funder's line against one core enterprise: `used` is what is lent and not yet
    repaid; `repaid` the platform's latest `repaid_total`."""

    core: str
    line: int
    used: int
    repaid: int = 0


class LineUpdate(_Event, tag="line"):
    """To every connection of a funder whose line changed, after the fills that lent it
    at once: the line as it now stands. `reason` says why: `set`, a `set_credit_line`
    from any of its connections (the others would not hear of it: an unnamed command's
    answer goes to its sender only), or `repaid`, the platform's `repay`."""

    core: str
    line: int
    used: int
    repaid: int
    reason: Literal["set", "repaid"]


class SuspensionUpdate(_Event, tag="suspension"):
    """To every connection of a participant an admin suspended (after the `done`s of
    the orders that ended) or reinstated: a page that is open learns of it at once."""

    suspended: bool


class Status(_Event, tag="status"):
    """The answer to `status`: resting orders oldest first; lines by core enterprise;
    whether an admin has suspended the sender's trading."""

    orders: list[OrderStatus]
    lines: list[LineStatus]
    suspended: bool = False


class FillPage(_Event, tag="fills"):
    """The answer to `fills`: one's own fills, oldest first.

    `more` says whether fills after the last one listed exist already; `next` is the
    `after` to ask for them with: the last trade id listed, or the request's own `after`
    when the page is empty (null only for an empty page of the newest fills), so a client
    can always keep it as its cursor.
    """

    fills: list[Fill]
    more: bool
    next: str | None
    ref: str | None = None


class Error(_Event, tag="error"):
    """A message the gateway could not take (malformed, not allowed); nothing changed.

    `client_id` is the message's own, when it could be read (an order with one wrong
    field still says which order it was), so a client with several orders in flight
    knows which one was refused; `ref` is the `ref` of the read it answers (`quote`,
    `fills`, `subscribe`, `unsubscribe`)."""

    code: str
    message: str
    path: str | None = None
    client_id: str | None = None
    ref: str | None = None


class Unconfirmed(_Event, tag="unconfirmed"):
    """In place of the `accepted` or `rejected` of a command when the journal stopped
    before the write holding it (or one before it) returned: it may or may not survive
    the restart. The sender sends it again with the same `client_id` once the gateway is
    back and gets the original answer, or a fresh one. A type of its own, not an
    `error`: an `error` says nothing changed, and a client that takes this one for a
    refusal and sends the order afresh, under a new client id, could borrow twice."""

    client_id: str | None
    message: str


class Subscribed(_Event, tag="subscribed"):
    """The answer to `subscribe` with `fills`: the trade of every command after `seq`
    comes on this connection, and of none before. Without it a platform could not tell
    where its live feed begins, so which trades to read back from the fill stream after
    a reconnect."""

    fills: bool
    seq: int
    ref: str | None = None


class Welcome(_Event, tag="welcome"):
    """Sent once authenticated: who the connection is and what it may do."""

    participant: int
    name: str
    role: Role
    segments: list[str]
    cancel_on_disconnect: bool = False




# --- The journal and the platform's fill stream --------------------------------------


class JournalEntry(Struct, array_like=True, frozen=True, gc=False):
    """One accepted command as the sequencer stamped it: the unit of replay."""

    seq: int
    ts: int                 # ns since the epoch, from the gateway's clock
    participant: int
    command: Command

    @property
    def ends_at(self) -> int:
        """The last sequence number the entry uses up: its own, or the last one a `skip`
        skips. The engine's `seq` once it is applied, and the journal id of a batch that
        it ends."""
        cmd = self.command
        return cmd.last if type(cmd) is Skip else self.seq


class Trade(_Event, tag="trade"):
    """One fill as the platform receives it on its Redis stream (one entry per fill).

    `trade_id` is `"<seq>-<n>"`: the n-th fill of the command with that sequence number.
    It is also the stream entry id, so a re-published fill cannot get a second id. The
    platform role can also receive these over the WebSocket (`subscribe` with `fills`).
    """

    trade_id: str
    seq: int
    ts: int
    segment: str
    core: str
    tenor_days: int
    funder: int
    sme: int
    bid_order_id: int
    ask_order_id: int
    bid_client_id: str
    ask_client_id: str
    rate_bps: int
    amount: int


Event = (Accepted | Rejected | Fill | Done | Quote | BookUpdate | Status | LineUpdate
         | SuspensionUpdate | FillPage | Error | Unconfirmed | Subscribed | Welcome
         | Trade)

json_decoder = msgspec.json.Decoder(ClientMessage)
json_encoder = msgspec.json.Encoder()
journal_encoder = msgspec.msgpack.Encoder()
journal_decoder = msgspec.msgpack.Decoder(list[JournalEntry])


_AT = re.compile(r" - at `(\$[^`]*)`$")
_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


#: What each pattern asks for, in words: msgspec's message quotes the regex itself,
#: which a client reads escaped once more in JSON.
_PATTERNS = {
    _NEW_ID: "letters, digits, `_`, `.` or `-`",
    _TRADE_ID: 'a trade id, "<seq>-<n>" (such as "57-0"), each part at most 19 digits',
}


def plain_error(message: str) -> str:
    """A msgspec `ValidationError`'s message with each pattern it quotes put in words."""
    for pattern, words in _PATTERNS.items():
        message = message.replace(f"`str` matching regex {pattern!r}", words)
    return message


def error_path(message: str) -> str:
    """The JSON path of what a msgspec `ValidationError` refuses, down to the field:
    msgspec gives the path of the object in which a field is unknown or missing (and
    nothing at the top level), not the field's own."""
    at = _AT.search(message)
    path = at.group(1) if at else "$"
    field = _FIELD.search(message)
    return f"{path}.{field.group(1)}" if field is not None else path


def decode_journal(batch: bytes, on_lax: Callable[[msgspec.ValidationError], None] | None = None
                   ) -> list[JournalEntry]:
    """A journal batch. Decoded with the wire types and their bounds (lengths, ranges,
    patterns), which are only the gateway's checks of what a client sends: an entry
    journaled before a bound was tightened (a segment id `"X-30\n"`, before ids could
    not end in a newline) must still replay, so one that fails them is decoded again
    without them (ADR 8, addendum). The engine's own rules still apply to it. `on_lax`
    hears of it (this module does no I/O; the caller logs)."""
    try:
        return journal_decoder.decode(batch)
    except msgspec.ValidationError as exc:
        if on_lax is not None:
            on_lax(exc)
        return [JournalEntry(e.seq, e.ts, e.participant, _STRICT[type(e.command)](
            **msgspec.structs.asdict(e.command))) for e in _lax_journal().decode(batch)]


def _unbounded(annotation: Any) -> Any:
    """The type without its `Meta` bounds, inside unions too."""
    if get_origin(annotation) is Annotated:
        return _unbounded(get_args(annotation)[0])
    # `X | None` resolves to `typing.Optional[X]` (a `typing.Union`), not a `UnionType`
    if get_origin(annotation) in (Union, UnionType):
        return functools.reduce(operator.or_, map(_unbounded, get_args(annotation)))
    return annotation


_STRICT: dict[type, type] = {}


@functools.cache
def _lax_journal() -> msgspec.msgpack.Decoder[list[Any]]:
    """The decoder of `decode_journal`'s second try, made the first time it is needed."""
    lax = []
    for kind in get_args(Command):
        config = kind.__struct_config__
        twin = msgspec.defstruct(
            kind.__name__, [(f.name, _unbounded(f.type), f.default)
                            for f in msgspec.structs.fields(kind)],
            tag=config.tag, tag_field=config.tag_field, forbid_unknown_fields=True,
            kw_only=True)
        _STRICT[twin] = kind
        lax.append(twin)
    entry = msgspec.defstruct("JournalEntry", [("seq", int), ("ts", int),
                                               ("participant", int),
                                               ("command", functools.reduce(operator.or_, lax))],
                              array_like=True)
    return msgspec.msgpack.Decoder(list[entry])  # type: ignore[valid-type]


def fill_of(trade: Trade, side: Literal["bid", "ask"], funder_name: str) -> Fill:
    """The trade as its funder (`bid`) or its SME (`ask`) is told of it."""
    bid = side == "bid"
    return Fill(
        trade_id=trade.trade_id, seq=trade.seq, ts=trade.ts, segment=trade.segment,
        core=trade.core, tenor_days=trade.tenor_days, funder=trade.funder,
        funder_name=funder_name, sme=trade.sme, rate_bps=trade.rate_bps,
        amount=trade.amount, side=side,
        client_id=trade.bid_client_id if bid else trade.ask_client_id,
        order_id=trade.bid_order_id if bid else trade.ask_order_id)
