"""The journal on Redis Streams: group commit of accepted commands, the platform's fill
stream, and reading it all back for recovery and for the snapshotter.

Group commit without a timer: while a write is in flight, newly accepted commands
wait in `pending`; when it returns, all of them go in the next one, so batches grow with
load. Up to `max_inflight` writes may be in flight on the one connection (Redis answers
them in order); 1 is best when Redis shares the machine's few cores (measured: fewer,
larger writes cost less CPU than the round trip they save), more when it is far away.

Each write is one atomic script call: one fill-stream entry per trade (its id is the
trade id), the trade in its funder's and its SME's own stream, and last one journal
entry for the whole batch (its stream id is the last sequence number it uses up), the
commit record. Atomic, so a write that succeeds lands whole; a write that fails part
way (only when keys hold ids from another history, see WRITE_SCRIPT) journals nothing,
and the start refuses the streams it left ahead of the journal. Explicit ids, so a
write that may or may not have landed is checked, not repeated. A command's replies are
released only when its write has returned. The writes, and the checks of what Redis
holds before writing again, go over the journal's own connection (`service.resp`), the
script by its digest; reads for recovery use redis-py.

Keys share the hash tag of the engine shard (`{main}` by default), so one shard's keys
live in one Redis Cluster slot and the script stays legal when segments are sharded
over several engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from matcher import protocol as wire
from service import resp
from service.tasks import cancel_all

log = logging.getLogger("matcher.journal")

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of one engine shard."""

    shard: str = "main"

    @property
    def journal(self) -> str:
        return f"matcher:{{{self.shard}}}:journal"

    @property
    def fills(self) -> str:
        return f"matcher:{{{self.shard}}}:fills"

    def fills_of(self, participant: int) -> str:
        """One participant's trades, in order, under their trade ids (`trade_from_row`)."""
        return f"matcher:{{{self.shard}}}:fills-of:{participant}"

    @property
    def journal_id(self) -> str:
        """A random name of the journal this Redis holds (`archive.journal_id`)."""
        return f"matcher:{{{self.shard}}}:journal-id"

    @property
    def archive_lock(self) -> str:
        """Held by the one process moving the journal to its archive."""
        return f"matcher:{{{self.shard}}}:journal-archive-lock"

    @property
    def archive_failures(self) -> str:
        """How many times the journal's archive could not be written (the snapshotter
        counts them here; the gateway exports them)."""
        return f"matcher:{{{self.shard}}}:journal-archive-failures"

    @property
    def writer(self) -> str:
        """The gateway that writes the journal: its token, while it renews it (ADR 31)."""
        return f"matcher:{{{self.shard}}}:writer"

    @property
    def probe(self) -> str:
        """Written by the gateway every second with a short expiry: whether Redis takes
        writes, also in a quiet market."""
        return f"matcher:{{{self.shard}}}:probe"

    @property
    def snapshot(self) -> str:
        return f"matcher:{{{self.shard}}}:snapshot"

    def snapshot_staging(self, token: str) -> str:
        """Where one writer puts a snapshot's parts before publishing it."""
        return f"matcher:{{{self.shard}}}:snapshot-staging:{token}"

    @property
    def snapshot_seq(self) -> str:
        """The sequence number the stored snapshot covers, set in the same script."""
        return f"matcher:{{{self.shard}}}:snapshot-seq"


def trade_fields(trade: wire.Trade) -> dict[str, str | int]:
    """A trade as flat stream fields, readable with any Redis client."""
    return {f: getattr(trade, f) for f in trade.__struct_fields__}


_INT_FIELDS = frozenset(f.name for f in msgspec.structs.fields(wire.Trade) if f.type is int)


def decode_trade(fields: dict[bytes, bytes]) -> wire.Trade:
    """A fill-stream entry (the flat string fields of `trade_fields`) back into a Trade.

    Raises ValueError for one the write script could not have written: an integer not
    in plain digits (`strict=False` alone reads "1e3" as 1000), or a loan of nothing.
    """
    text = {k.decode(): v.decode() for k, v in fields.items()}
    for name in _INT_FIELDS & text.keys():
        if not (text[name].isascii() and text[name].isdigit()):
            raise ValueError(f"fill {text.get('trade_id')}: {name} is not a whole number: "
                             f"{text[name]!r}")
    trade = msgspec.convert(text, wire.Trade, strict=False)
    if trade.amount < 1:
        raise ValueError(f"fill {trade.trade_id}: amount {trade.amount}")
    return trade


#: The field of a participant's stream entry: the trade's values packed as one row.
#: The name carries the row's format: a change of `wire.Trade` needs a new one.
ROW_FIELD = b"t1"
_TradeRow = msgspec.defstruct(
    "_TradeRow", [(f.name, f.type) for f in msgspec.structs.fields(wire.Trade)],
    array_like=True)
_read_row = msgspec.msgpack.Decoder(_TradeRow, strict=False).decode    # "250" -> 250


def trade_from_row(fields: dict[bytes, bytes]) -> wire.Trade:
    """A participant's stream entry (`ROW_FIELD`: the values of `trade_fields` in order,
    as strings, packed by the write script) back into a Trade.

    Raises ValueError for an entry in another format (msgspec's errors are ValueErrors).
    """
    row = fields.get(ROW_FIELD)
    if row is None:
        raise ValueError(f"not a trade row (fields {sorted(fields)}, expected {ROW_FIELD!r})")
    return wire.Trade(**msgspec.structs.asdict(_read_row(row)))


def _write_script(fields: tuple[str, ...]) -> bytes:
    """The journal's write script, written out for the trade's fields: each XADD names
    its fields and arguments literally, so Lua builds no argument tables per trade
    (measured: a third less script time than a loop over the fields, 53 against 80 us
    for a batch of five trades, and the same entries)."""
    pairs = ", ".join(f"'{name}', ARGV[i + {j}]" for j, name in enumerate(fields, 1))
    values = ", ".join(f"ARGV[i + {j}]" for j in range(1, len(fields) + 1))
    return f"""
if ARGV[5] ~= '' then
  local writer = redis.call('GET', KEYS[3])
  if not writer then
    local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    local have = last[1] and last[1][1] or '0-0'
    if have ~= ARGV[6] then
      if tonumber(string.match(have, '^%d+')) < tonumber(string.match(ARGV[6], '^%d+')) then
        return redis.error_reply('GAP the journal ends at ' .. have ..
                                 ', this write follows ' .. ARGV[6])
      end
      return redis.error_reply('LAPSED ' .. have)
    end
    redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[7])
  elseif writer ~= ARGV[5] then
    return redis.error_reply('FENCED ' .. writer)
  end
end
if ARGV[4] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local have = last[1] and last[1][1] or '0-0'
  if have ~= ARGV[4] then
    if tonumber(string.match(have, '^%d+')) >= tonumber(string.match(ARGV[1], '^%d+')) then
      return 0
    end
    return redis.error_reply('GAP the journal ends at ' .. have ..
                             ', this write follows ' .. ARGV[4])
  end
end
local k = 4
local i = 8
local n = #ARGV
while i <= n do
  redis.call('XADD', KEYS[2], ARGV[i], {pairs})
  local packed = cmsgpack.pack({{{values}}})
  redis.call('XADD', KEYS[k], ARGV[i], 't1', packed)
  redis.call('XADD', KEYS[k + 1], ARGV[i], 't1', packed)
  k = k + 2
  i = i + {len(fields) + 1}
end
if ARGV[1] ~= '' then redis.call('XADD', KEYS[1], ARGV[1], 'n', ARGV[2], 'e', ARGV[3]) end
return 1
""".encode()


#: One write of the journal, atomic in Redis (a script runs alone, and its effects reach
#: the append-only file as one transaction): one fill-stream entry per trade under the
#: trade id, the trade as one MessagePack row (`trade_from_row`) in its funder's and its
#: SME's stream (ADR 18), then the batch's journal entry. One request and one reply,
#: where MULTI/EXEC would need a reply per command. A script is not rolled back when a
#: command in it fails (an XADD fails when its stream holds a later id: keys left from
#: another history), so the journal entry, the commit record that recovery and the
#: retry check read, goes last: a write that fails part way journals nothing and
#: acknowledges nothing, and the journal stops. The trades it wrote before failing stay
#: on the fill stream, ahead of the journal, and `check_streams_follow` refuses to
#: start on that.
#: Given the id of the entry a batch follows, the script first reads where the journal
#: ends: the batch writes only right after that entry, so the journal never has a gap
#: (`GAP`, and the journal stops), and a batch already there (a write that landed after
#: its reply timed out, then sent again) writes nothing and returns 0. The read costs
#: Redis about 8 us a write, so the journal asks for it where a write can follow a
#: failure or another Redis: every write with several in flight, every write again
#: after a failure, and the first write on each new connection (`Journal._send`). With
#: one write in flight, each is sent only once the one before it succeeded on the same
#: connection, which is the check already made.
#: Given the writer's token, the script writes nothing unless this gateway holds the
#: shard's writer lease (`FENCED <holder>`, and the journal stops; ADR 31). A lease that
#: lapsed (a stall longer than it) is taken again only if the journal still ends where
#: this batch follows (else `LAPSED <last id>`: another gateway wrote meanwhile, and the
#: journal stops). Checked before anything is written: a write that went on to fail
#: left its trades on the fill streams (found in review).
#: KEYS: journal, fills, writer lease, then per trade its funder's and its SME's stream
#: (`fills_of`).
#: ARGV: journal entry id ("" for none: `ends_at` of the batch's last command), how many
#: sequence numbers the batch uses up (its commands, and the numbers a `skip` skips),
#: batch, the id of the entry it follows ("0-0" for the first; "" to skip the check),
#: the writer's token ("": no lease), the id of the entry it follows again (for the
#: lease's check, always given), the lease's time to live in ms, then per trade its id
#: and the values of `trade_fields` in order (`trade_values`).
WRITE_SCRIPT = _write_script(wire.Trade.__struct_fields__)
_SCRIPT_SHA = hashlib.sha1(WRITE_SCRIPT).hexdigest().encode()


def trade_values(trade: wire.Trade) -> tuple[str | int, ...]:
    """The trade's id, then the values of `trade_fields` in order, as the script takes
    them (`resp.pack` writes strings and integers as Redis strings)."""
    return (trade.trade_id, *msgspec.structs.astuple(trade))


def stream_seq(entry_id: bytes | str) -> int:
    """The sequence part of a stream id `"<seq>-<n>"`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark a reply's failure as seen (asyncio logs unretrieved ones)."""
    if not fut.cancelled():
        fut.exception()


def _unknown_script(exc: BaseException | None) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT")


def _gap(exc: BaseException | None) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("GAP ")


@dataclass(slots=True)
class _Batch:
    """Commands written together, and the future their replies wait for."""

    entries: list[wire.JournalEntry]
    trades: list[wire.Trade]
    done: asyncio.Future[int]
    reply: asyncio.Future[Any] | None = None
    sent: float = 0.0                 # perf_counter when it went to Redis


class JournalLost(RuntimeError):
    """Redis holds less than was acknowledged: it lost writes (see README, durability)."""


def _lost(last: int, acknowledged: int) -> JournalLost:
    return JournalLost(f"Redis journal ends at seq {last}, but {acknowledged} was "
                       "acknowledged: Redis lost writes (docs/operations.md, \"Redis lost "
                       "acknowledged writes\": restore them from a copy, or start with "
                       f"--lost-up-to {acknowledged})")


class WriterReplaced(RuntimeError):
    """Another gateway holds the shard's writer lease: this one must not write (ADR 31)."""


def writer_refusal(reply: str, acknowledged: int) -> Exception | None:
    """What a lease's refusal means, from the write script's or the renewal's reply
    (`FENCED <holder>`, `LAPSED <where the journal ends>`); None for any other reply.
    A journal that ends short of what was acknowledged lost writes (a Redis restarted
    empty takes the lease's key with it), which is not another gateway."""
    kind, _, what = reply.partition(" ")
    if kind == "LAPSED" and stream_seq(what) < acknowledged:
        return _lost(stream_seq(what), acknowledged)
    if kind == "LAPSED":
        who = (f"this gateway's lease lapsed and another wrote the journal meanwhile (it "
               f"ends at {what}); another may hold")
    elif kind == "FENCED":
        who = f"another gateway ({what}) holds"
    else:
        return None
    return WriterReplaced(f"{who} this shard's writer lease and writes its journal: this "
                          "one stops (docs/operations.md, \"Another gateway writes the "
                          "journal\")")


class Journal:
    """Writes accepted commands in groups and says when each is durable.

    `on_batch(commands, seconds)` hears of each durable batch: its size and the time
    from sending it to Redis's answer (Redis, its fsync, and any wait of ours to read
    the answer), the journal's share of every acknowledgement's latency; None for a
    batch that had to be written again after a failure.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, *, max_retry_delay: float = 1.0,
                 written_seq: int = 0,
                 on_batch: Callable[[int, float | None], None] | None = None,
                 max_inflight: int = 1, writer: str = "", writer_ttl_ms: int = 10_000) -> None:
        self.client = client
        self.writer = writer                # the lease token the script checks ("": none)
        self.writer_ttl_ms = writer_ttl_ms
        self.keys = keys
        self.max_retry_delay = max_retry_delay
        self.written_seq = written_seq            # everything up to here is in Redis
        self.pending: list[wire.JournalEntry] = []
        self._trades: list[wire.Trade] = []
        self._durable: asyncio.Future[int] | None = None   # resolves when `pending` lands
        self._window: deque[_Batch] = deque()               # sent, in order, not yet durable
        self._recovering = False                            # a write in the window failed
        self._checked = -1                  # the connection generation found to hold all
        self._sent_on = -1                  # the connection generation of the last write
        self.max_inflight = max_inflight
        self.error: Exception | None = None                # set once the journal stops
        self._wake = asyncio.Event()
        self._verify = False                # `verify` asked for a check between writes
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        self.written_at = 0.0           # time.monotonic() of the last write that landed
        self.batches = 0
        self._on_batch = on_batch
        self._journal_key = keys.journal.encode()
        self._fills_key = keys.fills.encode()
        self._writer_key = keys.writer.encode()
        self._own_keys: dict[int, bytes] = {}
        self._conn = resp.Connection.like(client)     # the writes' own connection
        self._conn.on_settled = self._settle
        self.on_wrong_node: Callable[[], None] | None = None     # see `_forget_node`

    # --- the write side ---

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    def append(self, entry: wire.JournalEntry, trades: list[wire.Trade]) -> asyncio.Future[int]:
        """Queue an accepted command and its trades; the future resolves once durable.

        Commands queued together share one future, so a caller can tell batches apart.
        """
        if self.error is None:
            self.pending.append(entry)
            self._trades.extend(trades)
        return self._batch_future()

    def _batch_future(self) -> asyncio.Future[int]:
        if self._durable is None:
            self._durable = asyncio.get_running_loop().create_future()
            if self.error is not None:      # stopped: nothing will ever be written
                self._durable.set_exception(self.error)
            self._wake.set()
        return self._durable

    @property
    def backlog(self) -> int:
        return len(self.pending)

    def barrier(self) -> asyncio.Future[int] | None:
        """The future of the last write that is queued or in flight; None when all is
        durable. Answers that depend on the engine's state wait for it."""
        if self._durable is not None:
            return self._durable
        if self._window:
            return self._window[-1].done
        return None

    def verify(self) -> None:
        """Check, between writes and on the writes' own connection (a new one if Redis
        went away), that Redis still holds everything acknowledged; if not, the journal
        stops (`JournalLost`) now rather than at the next command. A Redis restarted
        empty in a quiet market took writes, so `/health` said ready and the 9:00
        checks passed, and the first command of the day was answered `unconfirmed`
        (found in an operator's audit). The app's probe asks once a quiet second."""
        if self._idle():
            self._verify = True
            self._wake.set()

    async def flush(self) -> None:
        """Wait until everything appended so far is durable; raise if it never will be."""
        last = self.barrier()
        if last is not None:
            await asyncio.shield(last)
        if self.error is not None:          # stopped with nothing queued: still stopped
            raise self.error

    async def close(self) -> None:
        if self._task is not None:     # it may be waiting for Redis (`_landed`)
            await cancel_all([self._task])
        self._conn.close()

    async def _run(self) -> None:
        """Send what is pending as soon as there is room in the window; after a failed
        write, settle the window in order before sending anything new."""
        unreachable, retries = 0.0, 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.error is not None:
                return
            try:
                if self._recovering:
                    await self._recover()
                if self._verify and self._idle():
                    if self._ready():
                        await self._landed(None)
                    else:
                        await self._connected()
                    # Asked again, after the retry's pause, until Redis answers it: one
                    # that answered "later" (BUSY) left the journal unhealthy on a
                    # connection that stayed checked, /health 503 for good while writes
                    # landed (found in review).
                    self._verify = False
                    self.healthy = True
                if self._durable is not None and not self._window and not self._ready():
                    # A new connection may reach a restarted or replaced Redis: it must
                    # hold everything acknowledged before we write after it.
                    await self._connected()
                self._pump()
                if retries:
                    log.warning("journal reconnected to Redis after %d retries", retries)
                unreachable, retries = 0.0, 0
            except _TRANSIENT as exc:       # could not (re)connect: retry like a write
                self.healthy = False
                if resp.wrong_node(exc):
                    await self._forget_node()
                unreachable = min(max(unreachable * 2, 0.05), self.max_retry_delay)
                retries += 1
                log.warning("journal cannot reach Redis (%s: %s); none of the %d commands "
                            "waiting is acknowledged; retrying in %.2fs", type(exc).__name__,
                            exc, len(self.pending), unreachable)
                await asyncio.sleep(unreachable)
                self._wake.set()
            except Exception as exc:   # a bug or lost data: nothing more can be acknowledged
                self._stop(self._as_refusal(exc))
                return

    async def _forget_node(self) -> None:
        """After a reply of a node that is not the master (a failover): drop the
        journal's connection, so that the next attempt connects afresh, to the new master
        when a DNS name or a proxy moved with it (the same connection would ask the old
        node for ever); and tell the readers on other connections (`on_wrong_node`: fill
        pages) and the client's idle pooled connections to do the same."""
        self._conn.close()
        if self.on_wrong_node is not None:
            self.on_wrong_node()
        await resp.reconnect_idle(self.client)

    async def _connected(self, *, healthy: bool = True) -> None:
        """Open a new connection: check that Redis holds everything acknowledged (it may
        have been restarted or replaced) and that it knows the script. `healthy`: the
        journal is then healthy (not while a write that failed waits to be retried: a
        replica takes a connection, and refuses the write again)."""
        await self._conn.ensure()
        await self._landed(None)
        await self._conn.call(resp.pack(b"SCRIPT", b"LOAD", WRITE_SCRIPT))
        self._checked = self._conn.generation
        self.healthy = healthy

    def _ready(self) -> bool:
        """Connected, and this connection was checked by `_connected`."""
        return self._conn.connected and self._conn.generation == self._checked

    def _take(self) -> _Batch:
        assert self._durable is not None
        batch = _Batch(self.pending, self._trades, self._durable)
        self.pending, self._trades, self._durable = [], [], None
        return batch

    def _pump(self) -> None:
        """Send what is pending if the window has room (called when commands arrive and
        when a reply frees the window, so the next write leaves at once)."""
        while (self._durable is not None and len(self._window) < self.max_inflight
               and not self._recovering and self.error is None and self._ready()):
            batch = self._take()
            # In the window before it is sent: if the send raises (a bug), `_stop` fails
            # it with the rest, and its commands are answered (`unconfirmed`).
            self._window.append(batch)
            batch.sent = time.perf_counter()
            batch.reply = self._send(batch)

    def _settle(self) -> None:
        """Replies come in order; each settles the oldest batch in the window. Called by
        the connection as soon as replies arrive: the next write goes out before the
        replies' acknowledgements are delivered (a loop turn later)."""
        try:
            self._settle_window()
            self._pump()
        except Exception as exc:   # a bug: nothing more can be acknowledged
            self._stop(exc)

    def _settle_window(self) -> None:
        while self._window and not self._recovering:
            batch = self._window[0]
            assert batch.reply is not None
            if not batch.reply.done():
                break
            exc = None if batch.reply.cancelled() else batch.reply.exception()
            if batch.reply.cancelled() or isinstance(exc, _TRANSIENT) or _unknown_script(exc):
                self._recovering = True
                self.healthy = False
                self._wake.set()
                return
            if exc is not None:
                self._stop(self._as_refusal(exc))
                return
            self._window.popleft()
            self._durable_batch(batch)

    def _durable_batch(self, batch: _Batch, *, timed: bool = True) -> None:
        """`timed`: the batch landed on its first send, so its time is a write's; one
        settled by `_recover` also holds the outage, which is not a write's time."""
        if batch.entries:
            self.written_seq = batch.entries[-1].ends_at
        self.written_at = time.monotonic()
        self.batches += 1
        if self._on_batch is not None and batch.entries:
            self._on_batch(len(batch.entries),
                           time.perf_counter() - batch.sent if timed else None)
        batch.done.set_result(self.written_seq)

    async def _recover(self) -> None:
        """Settle the window oldest first: a write whose reply was lost may have landed
        (checked, not repeated), one that did not is written again."""
        rewritten = False
        while self._window:
            if self.error is not None:      # abandoned meanwhile: nothing more to settle
                return
            batch = self._window[0]
            assert batch.reply is not None
            with contextlib.suppress(Exception):
                await asyncio.shield(batch.reply)     # still in flight: let it finish
            if batch.reply.cancelled() or batch.reply.exception() is not None:
                exc = None if batch.reply.cancelled() else batch.reply.exception()
                if _unknown_script(exc):    # the script did not run: send its text
                    try:
                        await self._write(batch.entries, batch.trades)
                    except _TRANSIENT as again:
                        await self._write_until_done(batch.entries, batch.trades,
                                                     failed=again)
                # A batch pipelined behind one that did not run (BUSY, say) found the
                # journal short of the entry it follows, and did not run either: the
                # window is written again in order (a GAP there stopped the journal).
                elif exc is None or isinstance(exc, _TRANSIENT) or (rewritten and _gap(exc)):
                    await self._write_until_done(batch.entries, batch.trades, failed=exc)
                else:
                    raise exc
                rewritten = True
            self._window.popleft()
            self._durable_batch(batch, timed=False)
        self._recovering = False
        self.healthy = True

    def abandon(self, why: str) -> None:
        """Give up the writes not yet returned (a shutdown that could not wait longer for
        Redis): their commands are answered `unconfirmed`, as when the journal stops,
        rather than left without an answer while a write still on its way may land."""
        if self.error is None:
            self._stop(RuntimeError(why))

    def replaced(self, why: str) -> None:
        """The renewal's refusal (`writer_refusal`): another gateway took the writer
        lease, or wrote while it had lapsed (`WriterReplaced`), or Redis lost what was
        acknowledged (`JournalLost`). Stop before writing after it."""
        self._stop(writer_refusal(why, self.written_seq) or WriterReplaced(why))

    def _as_refusal(self, exc: BaseException) -> BaseException:
        """A write script's error reply, as what it means when it is the lease's."""
        if isinstance(exc, ResponseError):
            return writer_refusal(str(exc), self.written_seq) or exc
        return exc

    def _idle(self) -> bool:
        """Nothing of ours on its way to Redis, and the journal not stopped."""
        return not self._window and self._durable is None and self.error is None

    def quiet_tail(self) -> bytes | None:
        """The id the journal ends at, if nothing of ours is on its way to it: what the
        lease's renewal may check before taking a lapsed lease again."""
        return b"%d-0" % self.written_seq if self._idle() else None

    def _stop(self, exc: BaseException) -> None:
        if self.error is not None:          # once: `abandon` may come first
            return
        log.critical("journal stopped, nothing more will be acknowledged: %s", exc)
        self.healthy = False
        self.error = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
        for batch in self._window:
            if not batch.done.done():
                batch.done.set_exception(self.error)
            if batch.reply is not None:     # its outcome no longer matters
                batch.reply.add_done_callback(_consume)
        self._window.clear()
        if self._durable is not None:       # what queued up behind it fails too
            self._durable.set_exception(self.error)
        self.pending, self._trades = [], []
        self._wake.set()                    # the writer sees the error and ends

    async def _write_until_done(self, entries: list[wire.JournalEntry],
                                trades: list[wire.Trade],
                                failed: BaseException | None) -> None:
        delay = 0.05
        attempt = 0
        while True:
            if failed is not None:
                attempt += 1
                if resp.wrong_node(failed):
                    await self._forget_node()
                log.warning("journal write of %d commands failed (%s: %s); none of them is "
                            "acknowledged; retrying in %.2fs", len(entries),
                            type(failed).__name__, failed, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
            if self.error is not None:      # abandoned (a shutdown): write nothing more
                raise self.error
            try:
                # Did the failed write land anyway? (A new connection may also reach a
                # restarted Redis: it must hold all that was acknowledged.)
                if not self._ready():
                    await self._connected(healthy=False)
                if await self._landed(entries[-1].ends_at if entries else None):
                    await self._check_ours(entries)
                    break
                await self._write(entries, trades)
                break
            except _TRANSIENT as exc:
                failed = exc
        if attempt:
            log.warning("journal write succeeded after %d retries", attempt)

    async def _check_ours(self, entries: list[wire.JournalEntry]) -> None:
        """The journal's entry under this batch's id is this batch: a number says only
        that something was written there. After a partition another gateway may have
        taken the lapsed lease and journaled under it; taken for ours, it was
        acknowledged as ours (found in review)."""
        if not entries:
            return
        entry_id = b"%d-0" % entries[-1].ends_at
        rows: Any = await self._conn.call(resp.pack(b"XRANGE", self._journal_key,
                                                    entry_id, entry_id))
        fields = dict(zip(rows[0][1][::2], rows[0][1][1::2], strict=True)) if rows else {}
        if fields.get(b"e") != wire.journal_encoder.encode(entries):
            raise WriterReplaced(
                f"the journal's entry {entry_id.decode()} is not the batch this gateway "
                "wrote there: another gateway journaled meanwhile, and this one stops "
                "(docs/operations.md, \"Another gateway writes the journal\")")

    def _send(self, batch: _Batch) -> asyncio.Future[Any]:
        """Send one batch without waiting; its reply settles it (`_settle`)."""
        check = self.max_inflight > 1 or self._conn.generation != self._sent_on
        self._sent_on = self._conn.generation
        return self._conn.request(self._pack(batch.entries, batch.trades, _SCRIPT_SHA,
                                             check=check))

    def _pack(self, entries: list[wire.JournalEntry], trades: list[wire.Trade],
              sha: bytes | None, *, check: bool = True) -> bytes:
        """One WRITE_SCRIPT call: by its digest, or with its text when `sha` is None;
        `check`: only right after the entry before it (see WRITE_SCRIPT)."""
        keys = [self._journal_key, self._fills_key, self._writer_key]
        for trade in trades:
            keys += (self._own_key(trade.funder), self._own_key(trade.sme))
        args: list[bytes | str | int] = [b"EVALSHA", sha] if sha is not None \
            else [b"EVAL", WRITE_SCRIPT]
        args += (len(keys), *keys)
        if entries:
            last = entries[-1].ends_at
            follows = b"%d-0" % (entries[0].seq - 1)
            args += (b"%d-0" % last, last - entries[0].seq + 1,
                     wire.journal_encoder.encode(entries), follows if check else b"",
                     self.writer, follows, self.writer_ttl_ms)
        else:
            args += (b"", 0, b"", b"", self.writer, b"%d-0" % self.written_seq,
                     self.writer_ttl_ms)
        for trade in trades:
            args += trade_values(trade)
        return resp.pack(*args)

    def _own_key(self, participant: int) -> bytes:
        key = self._own_keys.get(participant)
        if key is None:
            key = self._own_keys[participant] = self.keys.fills_of(participant).encode()
        return key

    async def _write(self, entries: list[wire.JournalEntry],
                     trades: list[wire.Trade]) -> None:
        """Write one batch and wait for it (the retry path)."""
        try:
            await self._conn.call(self._pack(entries, trades, _SCRIPT_SHA))
        except ResponseError as exc:
            if not _unknown_script(exc):
                raise
            await self._conn.call(self._pack(entries, trades, None))

    async def _landed(self, seq: int | None) -> bool:
        """Does Redis hold everything acknowledged, and the batch up to `seq` too?

        Asked on the journal's own connection: of the node the writes go to. Through the
        client's pool it could ask another, a connection left on the old master after a
        failover behind one address, still serving what it had, and take its shorter
        journal for lost writes (found in review). An error reply that says "later" is
        raised as `resp.NotNow` (a BUSY once read as an empty journal, "Redis lost
        writes")."""
        # As of the request: a write sent after it on this connection (`verify` runs
        # between writes, and one may follow) can land before this coroutine resumes.
        acknowledged = self.written_seq
        newest: Any = await self._conn.call(resp.pack(
            b"XREVRANGE", self._journal_key, b"+", b"-", b"COUNT", b"1"))
        last = stream_seq(newest[0][0]) if newest else 0
        if last < acknowledged:
            raise _lost(last, acknowledged)
        return seq is not None and last >= seq


# --- the read side -------------------------------------------------------------------

def lax_decoded(exc: Exception) -> None:
    """A journal batch that today's bounds refuse was decoded without them: it was
    journaled before they were tightened (ADR 8, addendum), or it is not what this
    service wrote. Replay goes on; the engine's rules judge its commands."""
    log.warning("a journal batch fails this version's bounds (%s); replayed without them",
                exc)


async def journal_start(client: aioredis.Redis, keys: Keys) -> int | None:
    """The sequence number of the first command Redis's journal holds (its first entry
    is a batch that uses up the `n` sequence numbers ending at its id); None when it
    holds none."""
    oldest: Any = await client.xrange(keys.journal, count=1)
    if not oldest:
        return None
    entry_id, fields = oldest[0]
    return stream_seq(entry_id) - int(fields[b"n"]) + 1


async def check_streams_follow(client: aioredis.Redis, keys: Keys, seq: int,
                               participants: Iterable[int]) -> None:
    """Refuse to start on a fill stream, or a participant's, that has had ids after the
    journal's last sequence number.

    The journal's entry is the commit record of each write. A stream that is ahead of it
    comes from another history (the journal deleted or restored without it, or a write
    that failed part way, see WRITE_SCRIPT): the next trade's write would fail on it, or
    the platform would read trades that were never acknowledged. What counts is the last
    id the stream ever generated, which `XDEL` does not lower. The shard's keys belong
    together: keep, restore or delete them together.
    """
    names = [keys.fills, *(keys.fills_of(p) for p in participants)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xinfo_stream(name)
    for name, info in zip(names, await pipe.execute(raise_on_error=False), strict=True):
        if isinstance(info, ResponseError):
            continue                                        # no such stream yet
        if isinstance(info, Exception):
            raise info
        last = info["last-generated-id"]
        if stream_seq(last) > seq:
            raise JournalLost(
                f"the stream {name} has had trade {last.decode()}, but the journal ends at "
                f"seq {seq}: its keys do not belong together (see the runbook, 'A fill "
                "stream is ahead of the journal')")


async def read_journal(client: aioredis.Redis, keys: Keys, after: int = 0,
                       chunk: int = 200, on_row: Callable[[bytes, bytes], None] | None = None,
                       ) -> AsyncGenerator[list[wire.JournalEntry], None]:
    """The journal's commands with sequence numbers above `after`, batch by batch;
    `on_row(entry id, encoded batch)` hears of each stream entry before its batch is
    handed out.

    The next chunk is requested before this one is handed out, so Redis prepares it
    while the caller applies.
    """
    ahead = asyncio.ensure_future(client.xrange(keys.journal, min=f"{after + 1}-0", count=chunk))
    try:
        while True:
            rows: Any = await ahead
            if not rows:
                return
            ahead = asyncio.ensure_future(
                client.xrange(keys.journal, min=f"({rows[-1][0].decode()}", count=chunk))
            # A caller that stops reading (recovery refusing a command) leaves the read
            # ahead behind, failing once the client is closed: not an error to log.
            ahead.add_done_callback(_consume)
            for entry_id, fields in rows:
                if on_row is not None:
                    on_row(entry_id, fields[b"e"])
                entries = wire.decode_journal(fields[b"e"], lax_decoded)
                yield [e for e in entries if e.seq > after] if entries[0].seq <= after \
                    else entries
    finally:
        ahead.cancel()
