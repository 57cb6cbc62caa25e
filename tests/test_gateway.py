"""`Gateway.handle` on its own, with stand-ins for Redis and the sockets (the gateway
benchmark's): a connection being closed has its later messages ignored."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from matcher import protocol as wire
from tests.bench.test_gateway_bench import PEOPLE, SEGMENTS, _gateway, _Transport
from tests.conftest import run


def test_messages_of_a_closing_connection_are_not_acted_on() -> None:
    async def scenario() -> None:
        gateway, journal, conns = await _gateway()
        funder = PEOPLE[0]
        conn = conns[funder.id]
        await asyncio.sleep(0)                          # the welcome is written
        written = conn.transport.writes
        line = b'{"type":"set_credit_line","core":"%s","amount":1000}' % \
            gateway.engine.segments[sorted(gateway.engine.segments)[0]].core.encode()
        gateway.handle(conn, line, 0.0)
        assert gateway.engine.seq == 1
        journal.land()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert conn.transport.writes == written + 1     # its `accepted`
        conn.closed = True                              # as when a slow consumer is dropped
        gateway.handle(conn, line, 0.0)
        gateway.handle(conn, b"not json", 0.0)
        journal.land()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert gateway.engine.seq == 1                  # nothing applied
        assert conn.transport.writes == written + 1     # and nothing answered

    run(scenario())


def test_budgets_are_kept_per_key_and_only_full_ones_are_pruned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP clients are counted by address, which nothing bounds: past `prune_at` keys
    the buckets that have refilled go (a new one is the same), the others stay."""
    from service import gateway

    now = [100.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    budgets = gateway.Budgets(rate=1.0, burst=2, prune_at=3)
    assert [budgets.allow("a") for _ in range(3)] == [True, True, False]
    assert budgets.allow("b") and budgets.allow("b")      # its own budget
    now[0] += 5.0                                         # both refilled
    assert budgets.allow("c") and budgets.allow("c") and not budgets.allow("c")
    assert budgets.allow("d")                             # 3 keys: prune a and b, not c
    assert set(budgets.buckets) == {"c", "d"}
    assert not budgets.allow("c")                         # c's spent budget was kept
    # A flood of addresses, none of them refilled: the oldest are forgotten, half at a
    # time, so the pass over them all is not made for each new one.
    for key in "efghij":
        budgets.allow(key)
    assert len(budgets.buckets) <= 3 and "j" in budgets.buckets and "c" not in budgets.buckets
    few = gateway.Budgets(rate=1.0, burst=2, prune_at=10)
    for key in range(10):
        few.allow(key)
    now[0] += 5.0                                           # all refilled, then
    for key in range(3):                                    # three spend again
        few.allow(key)
    few.allow("new")                   # fewer than half spending: all of those stay
    assert list(few.buckets) == [0, 1, 2, "new"]


def test_an_answer_never_overtakes_the_ack_of_a_batch_that_just_became_durable() -> None:
    """The journal settles a batch inside the Redis connection's callback, and the
    batch's acks go out in a callback of the next loop turn. A command rejected in
    between, in the same turn (messages are handled as parsed, ADR 19), is answered
    after those acks, not before: a client sees its answers in the order it sent."""
    async def scenario() -> list[bytes]:
        gateway, journal, conns = await _gateway()
        funder = PEOPLE[0]
        conn = conns[funder.id]
        await asyncio.sleep(0)                          # the welcome is written
        sent = _watch(conn)
        core = gateway.engine.segments[sorted(gateway.engine.segments)[0]].core
        gateway.handle(conn, b'{"type":"set_credit_line","core":"%s","amount":1000}'
                       % core.encode(), 0.0)
        journal.land()                                  # durable; its ack not yet out
        gateway.handle(conn, b'{"type":"cancel","client_id":"nothing-of-mine"}', 0.0)
        for _ in range(3):
            await asyncio.sleep(0)
        return sent

    written = b"".join(run(scenario()))
    accepted, rejected = written.find(b'"type":"accepted"'), written.find(b'"type":"rejected"')
    assert 0 <= accepted < rejected, written


def test_answers_held_for_the_journal_count_against_its_backlog() -> None:
    """While Redis is away, rejections wait with the commands for the next batch; a
    client sending them without end meets `unavailable` at `journal_backlog`, as new
    commands do, instead of growing what the gateway holds."""
    async def scenario() -> tuple[int, list[bytes]]:
        # Many SMEs, one rejection each: one participant alone meets its tenth first.
        gateway, _, [conn, *smes] = _gateway_with(PEOPLE[0], *PEOPLE[-30:],
                                                  journal_backlog=20)
        await asyncio.sleep(0)
        sent = [_watch(c) for c in smes]
        core = gateway.engine.segments[sorted(gateway.engine.segments)[0]].core
        gateway.handle(conn, b'{"type":"set_credit_line","core":"%s","amount":1000}'
                       % core.encode(), 0.0)            # a batch the journal never lands
        for i, sme in enumerate(smes):
            gateway.handle(sme, b'{"type":"cancel","client_id":"c%d"}' % i, 0.0)
        await asyncio.sleep(0)
        return len(gateway._held), [b for s in sent for b in s]

    held, sent = run(scenario())
    written = b"".join(sent)
    assert held == 20                                  # the command and 19 rejections
    assert written.count(b'"code":"unavailable"') == 11 and b"unknown_order" not in written


_decode_event = msgspec.json.Decoder(wire.Event).decode


def _events(sent: list[bytes]) -> list[wire.Event]:
    """The messages in the frames a stand-in socket was given."""
    out = []
    data, pos = b"".join(sent), 0
    while pos < len(data):          # unmasked server frames, RFC 6455 5.2
        n, pos = data[pos + 1], pos + 2
        if n >= 126:
            size = 2 if n == 126 else 8
            n, pos = int.from_bytes(data[pos:pos + size], "big"), pos + size
        out.append(_decode_event(data[pos:pos + n]))
        pos += n
    return out


def _books(sent: list[bytes]) -> list[wire.BookUpdate]:
    """The `book` messages among them."""
    return [e for e in _events(sent) if isinstance(e, wire.BookUpdate)]


def _bid(segment: str, n: int) -> bytes:
    return (b'{"type":"bid","client_id":"b%d","segment":"%s","rate_bps":%d,'
            b'"amount":1000000}' % (n, segment.encode(), 250 - n))


def _line(core: str) -> bytes:
    return b'{"type":"set_credit_line","core":"%s","amount":%d}' % (core.encode(), 10**9)


def _subscribe(*segments: str) -> bytes:
    return b'{"type":"subscribe","segments":[%s]}' % b",".join(
        b'"%s"' % s.encode() for s in segments)


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _funder_and_sme() -> tuple[Any, Any, Any, Any]:
    """The benchmark's gateway, and the connections of a funder and of an SME, their
    welcomes written."""
    gateway, journal, conns = await _gateway()
    await _turns()
    return gateway, journal, conns[PEOPLE[0].id], conns[PEOPLE[-1].id]


def _watch(conn: Any) -> list[bytes]:
    """What the gateway writes to a stand-in connection from now on."""
    sent: list[bytes] = []
    conn.transport.write = sent.append
    return sent


def _gateway_with(*people: Any, **limits: Any) -> tuple[Any, Any, list[Any]]:
    """A gateway with other `[limits]` and a stand-in connection for each of `people`,
    who join the benchmark's directory if not in it (the benchmark's `_gateway` connects
    all 6,367 with the demo's limits). Call it in a running loop."""
    import redis.asyncio as aioredis

    from matcher.engine import Engine
    from matcher.participants import Directory
    from service.gateway import Gateway
    from service.journal import Keys
    from service.metrics import Metrics
    from tests.bench.test_gateway_bench import DEMO, _Journal, _Transport

    journal = _Journal(aioredis.Redis(host="127.0.0.1", port=1), Keys("bench"))
    gateway = Gateway(Engine(SEGMENTS), journal,
                      Directory([*PEOPLE, *(p for p in people if p not in PEOPLE)]),
                      msgspec.structs.replace(DEMO.limits, **limits), Metrics())
    return gateway, journal, [gateway.attach(None, _Transport(), p) for p in people]


def test_book_updates_show_only_what_the_journal_has() -> None:
    """The engine applies a command before its write returns. A book update built while
    a later command is still being written is held until that write returns (and after
    the acks it shows), so no subscriber ever sees a bid that a failed write or a crash
    would take back; and a held update is dropped if the journal fails."""
    async def scenario() -> None:
        gateway, journal, conns = await _gateway()
        funder, sme = PEOPLE[0], PEOPLE[-1]
        segment = SEGMENTS[0]
        f, s = conns[funder.id], conns[sme.id]
        await asyncio.sleep(0)                          # the welcomes are written
        seen = _watch(s)
        gateway.handle(s, _subscribe(segment.id), 0.0)
        await asyncio.sleep(0)
        assert [b.seq for b in _books(seen)] == [0]     # nothing pending: at once
        gateway.handle(f, _line(segment.core), 0.0)
        gateway.handle(f, _bid(segment.id, 1), 0.0)     # seq 2, in the first write
        first = journal._take()                         # that write is in flight
        gateway.handle(f, _bid(segment.id, 2), 0.0)     # seq 3, in the next one
        first.done.set_result(2)                        # the first write returns
        await _turns()
        assert [b.seq for b in _books(seen)] == [0]     # bid 2 is not durable yet
        journal.land()                                  # now it is
        await _turns()
        latest = _books(seen)[-1]
        assert latest.seq == 3 and latest.best_rate_bps == 248

        # A subscriber arriving while a write is out gets its first book after it.
        other = conns[PEOPLE[-2].id]
        later = _watch(other)
        gateway.handle(f, _bid(segment.id, 3), 0.0)
        gateway.handle(other, _subscribe(segment.id), 0.0)
        await _turns()
        assert _books(later) == []
        # ... and none at all if that write fails: the journal is gone.
        failed = journal._take()
        failed.done.set_exception(ConnectionError("Redis went away"))
        await _turns()
        assert _books(later) == []

    run(scenario())


def test_books_of_segments_that_changed_between_ticks_go_out_in_one_write() -> None:
    """Each segment had its own timer, so a connection following several got a write
    for each, each at its own time: with thousands of followers that fan-out filled the
    loop (found in an audit). Books now go out on one tick for every segment that
    changed since the last: here two changes within the interval, one write."""
    async def scenario() -> list[list[int]]:
        gateway, journal, f, s = await _funder_and_sme()
        a, b, c = SEGMENTS[0], SEGMENTS[1], SEGMENTS[2]
        gateway.handle(f, _line(a.core), 0.0)
        gateway.handle(f, _line(b.core), 0.0)
        gateway.handle(f, _line(c.core), 0.0)
        journal.land()
        gateway.handle(s, _subscribe(a.id, b.id, c.id), 0.0)
        await asyncio.sleep(0.1)
        seen = _watch(s)
        for n, segment in enumerate((a, b, c)):        # A at once, B and C within 50 ms
            gateway.handle(f, _bid(segment.id, n), 0.0)
            journal.land()
            await _turns()
        await asyncio.sleep(0.1)
        return [[b.seq for b in _books([write])] for write in seen]

    writes = [w for w in run(scenario()) if w]
    assert len(writes) == 2 and len(writes[1]) == 2, writes


def test_the_ticks_space_out_as_more_connections_follow_books(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A book to each following connection a tick: the spacing keeps them to
    `BOOK_SENDS_PER_S` (here 100: 10 connections, a tick every 100 ms)."""
    from service import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "BOOK_SENDS_PER_S", 100)

    async def scenario() -> tuple[float, float, float]:
        gateway, journal, f, _s = await _funder_and_sme()
        segment = SEGMENTS[0]
        followers = [gateway.attach(None, _Transport(), p) for p in PEOPLE[-10:]]
        for conn in followers:
            gateway.handle(conn, _subscribe(segment.id), 0.0)
        gateway.handle(f, _line(segment.core), 0.0)
        journal.land()
        await asyncio.sleep(0.02)                       # a tick reached the 10
        spacing = gateway.book_spacing
        gateway.handle(f, _bid(segment.id, 1), 0.0)
        journal.land()
        await _turns()
        tick = gateway._book_tick
        assert tick is not None and isinstance(tick, asyncio.TimerHandle)
        loop = asyncio.get_running_loop()
        # Due `spacing` after the last tick (plus uvloop's millisecond), however long
        # this test took to get here: measured from the tick, not from the sleep.
        due = tick.when() - loop.time() + time.monotonic() - gateway._book_ticked
        for conn in followers:
            gateway.handle(conn, b'{"type":"unsubscribe","segments":["%s"]}'
                           % segment.id.encode(), 0.0)
        await asyncio.sleep(0.2)                        # the tick reached none
        return spacing, due, gateway.book_spacing

    spacing, due, later = run(scenario())
    assert spacing == 0.1 and 0.095 <= due <= 0.11, (spacing, due)
    assert later == 0.05                                # back to book_interval_ms


def test_a_subscriber_never_gets_an_older_book_and_the_last_is_the_final_state() -> None:
    """An update built while its barrier is the batch still being filled waits for it;
    commands that join that batch later make the batch's own acks publish a newer book.
    The older one must not follow the newer, and the last one sent shows every command
    (found in review: the subscriber saw seq 5 then 4, and nothing after)."""
    async def scenario() -> list[int]:
        gateway, journal, f, s = await _funder_and_sme()
        segment = SEGMENTS[0]
        seen = _watch(s)
        gateway.handle(s, _subscribe(segment.id), 0.0)
        gateway.handle(f, _line(segment.core), 0.0)
        gateway.handle(f, _bid(segment.id, 1), 0.0)
        journal.land()
        await _turns()                                  # published at once
        gateway.handle(f, _bid(segment.id, 2), 0.0)
        journal.land()
        await _turns()                                  # due in book_interval_ms
        gateway.handle(f, _bid(segment.id, 3), 0.0)     # the batch being filled
        await asyncio.sleep(0.07)                       # due: built at seq 4, waits
        gateway.handle(f, _bid(segment.id, 4), 0.0)     # joins that batch: seq 5
        await asyncio.sleep(0.07)                       # a write slower than the interval
        journal.land()
        await _turns()
        await asyncio.sleep(0.2)                        # anything trailing comes now
        return [b.seq for b in _books(seen)]

    seqs = run(scenario())
    assert seqs == sorted(seqs) and seqs[-1] == 5, seqs


def test_no_book_is_sent_once_the_journal_has_stopped() -> None:
    """A write in flight fails and the journal stops with nothing queued behind it: from
    then on there is no write to wait for, and the engine still holds the command that
    was never written. No book is sent at all (found in review: a `subscribe` got the
    live engine at once)."""
    async def scenario() -> list[wire.BookUpdate]:
        gateway, journal, f, s = await _funder_and_sme()
        segment = SEGMENTS[0]
        gateway.handle(f, _line(segment.core), 0.0)
        journal.land()
        await _turns()
        gateway.handle(f, _bid(segment.id, 1), 0.0)     # applied, being written
        journal._window.append(journal._take())
        journal._stop(RuntimeError("GAP: the journal does not end where it follows"))
        await _turns()
        assert journal.barrier() is None and gateway.accepting is False
        seen = _watch(s)
        gateway.handle(s, _subscribe(segment.id), 0.0)
        gateway.book_changed(segment.id)
        await asyncio.sleep(0.1)
        return _books(seen)

    assert run(scenario()) == []


def test_commands_in_flight_when_the_journal_stops_are_answered_unconfirmed() -> None:
    """The write holding them failed and the journal stopped: whether they survive a
    restart is unknown. Each answer becomes an `unconfirmed`, sent where it would have
    gone (one naming a client id to every connection of its sender, one without only
    to the connection that sent it); nothing is `accepted`. A rejection read from the
    state that was not written is unconfirmed too."""
    from matcher.participants import Participant

    async def scenario() -> tuple[list[wire.Event], list[wire.Event], list[wire.Event]]:
        gateway, journal, f, s = await _funder_and_sme()
        segment = SEGMENTS[0]
        f2 = gateway.attach(None, _Transport(), PEOPLE[0])   # the funder's second
        await _turns()
        seen, seen2, sme = _watch(f), _watch(f2), _watch(s)
        gateway.handle(f, _line(segment.core), 0.0)
        gateway.handle(f, _bid(segment.id, 1), 0.0)
        gateway.handle(f, _bid(segment.id, 1), 0.0)    # a retry, answered from that state
        journal._window.append(journal._take())
        journal._stop(RuntimeError("GAP: the journal does not end where it follows"))
        # In the same turn, before the failed batches' callbacks: refused, not applied
        # (it was applied, and answered `unconfirmed` though it could never be written).
        seq = gateway.engine.seq
        gateway.handle(f, _bid(segment.id, 2), 0.0)
        assert gateway.engine.seq == seq
        # A platform following the trades from now on would wait for ever: refused.
        platform = gateway.attach(None, _Transport(), Participant(  # type: ignore[arg-type]
            id=7, name="Platform", role="platform", key_sha256="p"))
        await _turns()
        heard = _watch(platform)
        gateway.handle(platform, b'{"type":"subscribe","fills":true}', 0.0)
        await _turns()
        assert [(type(e).__name__, e.code) for e in _events(heard)] == [   # type: ignore
            ("Error", "unavailable")]
        return _events(seen), _events(seen2), _events(sme)

    first, second, sme = run(scenario())
    unconfirmed = [(type(e).__name__, getattr(e, "client_id", None)) for e in first]
    assert unconfirmed == [("Rejected", "b2"), ("Unconfirmed", None),
                           ("Unconfirmed", "b1"), ("Unconfirmed", "b1")]
    assert "the journal has stopped" in first[0].message    # type: ignore[union-attr]
    assert [(type(e).__name__, getattr(e, "client_id", None)) for e in second] == [
        ("Unconfirmed", "b1"), ("Unconfirmed", "b1")]
    assert "read status and fills" in first[1].message    # type: ignore[union-attr]
    assert sme == []


def test_books_held_for_the_journal_stay_bounded() -> None:
    """While a write is out, each `subscribe` builds a book per segment that waits for
    it. A client repeating it must not grow what is held: one waits per connection and
    segment (the newest), and a connection that goes takes its own with it (found in
    review: 18,001 waiting on one write)."""
    async def scenario() -> tuple[int, int, int]:
        gateway, journal, f, s = await _funder_and_sme()
        segment = SEGMENTS[0]
        gateway.handle(f, _line(segment.core), 0.0)     # a write that does not return
        barrier = journal.barrier()
        assert barrier is not None
        every = _subscribe(*(g.id for g in SEGMENTS))
        for _ in range(2000):
            gateway.handle(s, every, 0.0)
        held = len(gateway._book_waiting)
        callbacks = len(barrier._callbacks)             # type: ignore[attr-defined]
        gateway.detach(s)
        return held, callbacks, len(gateway._book_waiting)

    held, callbacks, after = run(scenario())
    assert held == len(SEGMENTS) and callbacks <= len(SEGMENTS) + 2, (held, callbacks)
    assert after == 0


def test_one_participant_cannot_take_every_fills_page_slot() -> None:
    """`GET /v1/fills` has only a key's rate budget, not the connection's one page at a
    time: one key's requests could fill all 256 waiting slots and have every other
    participant's `fills` refused `busy` (found in review). A participant has at most
    `_WAITING_EACH` pages waiting; the others are still served."""
    from service import gateway as gateway_module
    from service.history import Page

    async def scenario() -> tuple[list[str], wire.FillPage | wire.Error, int]:
        gateway, _, _ = await _gateway()
        release = asyncio.Event()

        class SlowHistory:                   # a Redis slow to read (or reconnecting)
            async def page(self, participant: int, after: str | None,
                           limit: int) -> Page:
                await release.wait()
                return Page([], False, after)

        gateway.history = SlowHistory()      # type: ignore[assignment]
        hog, sme = PEOPLE[0], PEOPLE[-1]
        hogging = [asyncio.ensure_future(gateway.fill_page(hog, wire.FillsRequest()))
                   for _ in range(gateway_module._WAITING)]
        await _turns()
        other = asyncio.ensure_future(gateway.fill_page(sme, wire.FillsRequest(ref="mine")))
        await _turns()
        release.set()
        answers = await asyncio.gather(*hogging)
        codes = [a.code if isinstance(a, wire.Error) else "page" for a in answers]
        return codes, await other, len(gateway._waiting_of)

    codes, other, left = run(scenario())
    assert codes.count("page") == 4 and codes.count("busy") == len(codes) - 4, codes
    assert isinstance(other, wire.FillPage) and other.ref == "mine"
    assert left == 0                         # the counts go back to nothing


def test_books_keep_coming_when_each_write_takes_about_the_interval() -> None:
    """One write in flight, a command every 5 ms, each write taking 50 ms (the book
    interval): an update waiting for a write was replaced by the next one, which waited
    for the write after, and so on; the board froze while the acks flowed (found in
    review: 2 books in 2 s). The one waiting for the earliest write stays."""
    async def scenario() -> int:
        gateway, journal, f, s = await _funder_and_sme()
        segment = SEGMENTS[0]
        seen = _watch(s)
        gateway.handle(s, _subscribe(segment.id), 0.0)
        gateway.handle(f, _line(segment.core), 0.0)
        journal.land()
        await _turns()
        done = False

        async def writer() -> None:                     # one write at a time, 50 ms each
            while not done:
                if journal._durable is None:
                    await asyncio.sleep(0.001)
                    continue
                batch = journal._take()
                journal._window.append(batch)
                await asyncio.sleep(0.05)
                journal._window.popleft()
                batch.done.set_result(batch.entries[-1].seq)

        task = asyncio.get_running_loop().create_task(writer())
        before = len(_books(seen))
        for i in range(200):                            # 1 s of commands
            gateway.handle(f, _bid(segment.id, 1).replace(b'"b1"', b'"x%d"' % i), 0.0)
            await asyncio.sleep(0.005)
        done = True
        await task
        return len(_books(seen)) - before

    assert run(scenario()) >= 8            # about one a write (20 in the second); was 1


def test_a_subscribers_own_book_never_follows_a_newer_update() -> None:
    """With several writes in flight, a `subscribe`'s own book and the segment's update
    can wait for the same write, the update built later: the subscriber got seq 6, then
    its own 5 (found in review). No subscriber gets an older book after a newer one."""
    async def scenario() -> list[int]:
        gateway, journal, conns = await _gateway()
        segment = SEGMENTS[0]
        f, a, b = conns[PEOPLE[0].id], conns[PEOPLE[-1].id], conns[PEOPLE[-2].id]
        await _turns()
        seen = _watch(b)
        gateway.handle(a, _subscribe(segment.id), 0.0)
        gateway.handle(f, _line(segment.core), 0.0)
        gateway.handle(f, _bid(segment.id, 1), 0.0)
        journal.land()
        await _turns()

        def send() -> Any:
            batch = journal._take()
            journal._window.append(batch)
            return batch

        def land(batch: Any) -> None:
            assert journal._window.popleft() is batch
            batch.done.set_result(batch.entries[-1].seq)

        gateway.handle(f, _bid(segment.id, 2), 0.0)
        first = send()
        gateway.handle(f, _bid(segment.id, 3), 0.0)
        second = send()
        gateway.handle(f, _bid(segment.id, 4), 0.0)     # the write being filled
        await asyncio.sleep(0.06)
        land(first)
        await _turns()                                  # an update waits for the third
        gateway.handle(b, _subscribe(segment.id), 0.0)  # its own book, the same write
        gateway.handle(f, _bid(segment.id, 5), 0.0)
        third = send()
        await asyncio.sleep(0.06)
        land(second)
        await _turns()                                  # a newer update, the same write
        land(third)
        await _turns()
        await asyncio.sleep(0.1)
        return [book.seq for book in _books(seen)]

    seqs = run(scenario())
    assert seqs and seqs == sorted(seqs), seqs


def test_a_stopped_journal_is_named_in_the_refusal() -> None:
    """Once the journal has stopped, commands are refused `unavailable`; the message
    said "shutting down", and operators looked for a stop that never happened (found
    in review of the runbook)."""
    async def scenario() -> list[wire.Event]:
        gateway, journal, conns = await _gateway()
        segment = SEGMENTS[0]
        f = conns[PEOPLE[0].id]
        await _turns()
        gateway.handle(f, _line(segment.core), 0.0)
        journal._window.append(journal._take())
        journal._stop(RuntimeError("GAP: the journal does not end where it follows"))
        await _turns()
        sent = _watch(f)
        gateway.handle(f, _bid(segment.id, 1), 0.0)
        await _turns()
        return _events(sent)

    [answer] = run(scenario())
    assert isinstance(answer, wire.Rejected) and answer.code == "unavailable"
    assert "the journal has stopped" in answer.message, answer


def test_a_subscribe_builds_each_segments_book_once() -> None:
    """`segments` may name a segment many times (up to 1000 entries), or one already
    followed: a book was built and sent for each entry, so one message cost a thousand
    (found in review: a few such messages stalled every client for a second)."""
    async def scenario() -> tuple[int, int]:
        gateway, _, conns = await _gateway()
        s = conns[PEOPLE[-1].id]
        await _turns()
        seen = _watch(s)
        gateway.handle(s, _subscribe(*[SEGMENTS[0].id] * 1000), 0.0)
        await _turns()
        first = len(_books(seen))
        gateway.handle(s, _subscribe(SEGMENTS[0].id, SEGMENTS[1].id), 0.0)   # one new
        await _turns()
        return first, len(_books(seen)) - first

    assert run(scenario()) == (1, 1)


def test_subscribing_again_and_again_during_an_outage_holds_one_callback_per_write() -> None:
    """Subscribe, unsubscribe, subscribe... while a write is out: each book waiting for
    it added a callback to it, and an unsubscribe did not take it back (found in review:
    450,000 callbacks and 231 MB on one write, a 1.2 s stall when it landed)."""
    async def scenario() -> int:
        gateway, journal, f, s = await _funder_and_sme()
        segment = SEGMENTS[0]
        gateway.handle(f, _line(segment.core), 0.0)     # a write that does not return
        barrier = journal.barrier()
        assert barrier is not None
        for _ in range(1000):
            gateway.handle(s, _subscribe(segment.id), 0.0)
            gateway.handle(s, b'{"type":"unsubscribe","segments":["%s"]}'
                           % segment.id.encode(), 0.0)
        return len(barrier._callbacks)                  # type: ignore[attr-defined]

    assert run(scenario()) <= 2


def test_a_participant_may_rest_only_so_many_orders() -> None:
    """Nothing bounded one participant's resting orders: each costs memory, and a book's
    levels are walked at each update even where a funder whose line is used up shows
    nothing (found in review: 20,000 such bids made a few subscribes stall everyone).
    Beyond `resting_orders_per_participant` a new order that could rest is rejected
    `too_many_orders`, by the gateway (never journaled); a retry and an IOC are not."""
    async def scenario() -> list[tuple[str, str | None]]:
        gateway, journal, [f, s] = _gateway_with(PEOPLE[0], PEOPLE[-1],
                                                 resting_orders_per_participant=2)
        await _turns()
        sent = _watch(f)
        segment = SEGMENTS[0]
        gateway.handle(f, _line(segment.core), 0.0)
        for n in (1, 2, 3):
            gateway.handle(f, _bid(segment.id, n), 0.0)
        gateway.handle(f, _bid(segment.id, 1), 0.0)     # a retry of the first
        gateway.handle(s, b'{"type":"ask","client_id":"x","segment":"%s","amount":5,'
                       b'"tif":"ioc"}' % segment.id.encode(), 0.0)   # an IOC: let in
        gateway.handle(f, _bid(segment.id, 4), 0.0)     # 5 fen lent: both bids still rest
        journal.land()
        await _turns()
        gateway.handle(f, b'{"type":"cancel","client_id":"b1"}', 0.0)
        gateway.handle(f, _bid(segment.id, 5), 0.0)     # room again
        journal.land()
        await _turns()
        return [(e.client_id, e.code if isinstance(e, wire.Rejected) else "accepted")
                for e in _events(sent) if isinstance(e, wire.Accepted | wire.Rejected)]

    answers = run(scenario())
    assert answers == [(None, "accepted"), ("b1", "accepted"), ("b2", "accepted"),
                       ("b3", "too_many_orders"), ("b1", "accepted"),
                       ("b4", "too_many_orders"), ("b1", "accepted"), ("b5", "accepted")]


def test_a_segment_may_rest_only_so_many_orders() -> None:
    """Every sum a book forms stays inside int64 only below `MAX_RESTING` orders of the
    largest size (ADR 4), and nothing checked it. Beyond `resting_orders_per_segment` a
    new order that could rest there is rejected `segment_full` by the gateway, whoever
    sends it; a retry, an IOC ask and another segment are not."""
    async def scenario() -> list[tuple[str | None, str]]:
        gateway, journal, [f1, f2, s] = _gateway_with(PEOPLE[0], PEOPLE[1], PEOPLE[-1],
                                                      resting_orders_per_segment=3)
        await _turns()
        sent = [_watch(f1), _watch(f2), _watch(s)]
        full, other = SEGMENTS[0], SEGMENTS[1]
        for f in (f1, f2):
            gateway.handle(f, _line(full.core), 0.0)
            gateway.handle(f, _line(other.core), 0.0)
        gateway.handle(f1, _bid(full.id, 1), 0.0)
        gateway.handle(f1, _bid(full.id, 2), 0.0)
        gateway.handle(f2, _bid(full.id, 3), 0.0)
        gateway.handle(f2, _bid(full.id, 4), 0.0)      # a fourth: refused
        gateway.handle(f1, _bid(full.id, 1), 0.0)      # a retry of the first: answered
        gateway.handle(f2, _bid(other.id, 5), 0.0)     # another segment has room
        gateway.handle(s, b'{"type":"ask","client_id":"x","segment":"%s","amount":5,'
                       b'"tif":"ioc"}' % full.id.encode(), 0.0)   # an IOC: let in
        journal.land()
        await _turns()
        gateway.handle(f1, b'{"type":"cancel","client_id":"b1"}', 0.0)
        gateway.handle(f2, _bid(full.id, 6), 0.0)      # room again
        journal.land()
        await _turns()
        return [(e.client_id, e.code if isinstance(e, wire.Rejected) else "accepted")
                for watched in sent for e in _events(watched)
                if isinstance(e, wire.Accepted | wire.Rejected) and e.client_id]

    answers = run(scenario())
    assert answers == [("b1", "accepted"), ("b2", "accepted"), ("b1", "accepted"),
                       ("b1", "accepted"),
                       ("b3", "accepted"), ("b4", "segment_full"), ("b5", "accepted"),
                       ("b6", "accepted"), ("x", "accepted")]


def test_a_participant_at_its_cap_is_told_a_halted_segment_is_halted() -> None:
    """The caps are checked before the engine, which alone knows a halt: a funder at its
    cap that bid into a halted segment was told to cancel some of its orders (found in
    review). The gateway leaves halted segments to the engine's answer."""
    from matcher.participants import Participant

    async def scenario() -> list[str]:
        gateway, journal, [f] = _gateway_with(PEOPLE[0], resting_orders_per_participant=1)
        await _turns()
        sent = _watch(f)
        open_, halted = SEGMENTS[0], SEGMENTS[1]
        gateway.handle(f, _line(open_.core), 0.0)
        gateway.handle(f, _line(halted.core), 0.0)
        gateway.handle(f, _bid(open_.id, 1), 0.0)      # at the cap now
        admin = Participant(id=1, name="Admin", role="admin", key_sha256="a")
        gateway.submit(admin, wire.Halt(segment=halted.id), 0.0)
        gateway.handle(f, _bid(halted.id, 2), 0.0)
        gateway.handle(f, _bid(open_.id, 3), 0.0)
        journal.land()
        await _turns()
        return [e.code for e in _events(sent) if isinstance(e, wire.Rejected)]

    assert run(scenario()) == ["segment_halted", "too_many_orders"]


def test_a_suspended_participant_is_told_so_whatever_the_caps() -> None:
    """A suspended funder bidding into a full segment was told `segment_full` (found in
    review): the engine's `suspended` is the answer. The gateway also names only real
    traders, and lets a suspended id be reinstated after it left the directory."""
    from matcher.participants import Participant

    async def scenario() -> list[tuple[str, str]]:
        gateway, journal, [f1, f2, a] = _gateway_with(
            PEOPLE[0], PEOPLE[1], Participant(id=1, name="Admin", role="admin",
                                              key_sha256="a"),
            resting_orders_per_segment=1)
        await _turns()
        seen = [_watch(f2), _watch(a)]
        segment = SEGMENTS[0]
        for f in (f1, f2):
            gateway.handle(f, _line(segment.core), 0.0)
        gateway.handle(f1, _bid(segment.id, 1), 0.0)     # the segment is full now
        gateway.handle(a, b'{"type":"suspend","participant":%d}' % f2.participant.id, 0.0)
        gateway.handle(f2, _bid(segment.id, 2), 0.0)
        gateway.handle(a, b'{"type":"suspend","participant":1}', 0.0)       # the admin
        gateway.handle(a, b'{"type":"suspend","participant":424242}', 0.0)
        gateway.handle(a, b'{"type":"reinstate","participant":424242}', 0.0)
        journal.land()
        await _turns()
        gateway.engine.suspended.add(424242)        # suspended, then left the directory
        gateway.handle(a, b'{"type":"reinstate","participant":424242}', 0.0)
        journal.land()
        await _turns()
        return [(type(e).__name__, e.code if isinstance(e, wire.Rejected) else "")
                for watched in seen for e in _events(watched)
                if isinstance(e, wire.Accepted | wire.Rejected) and e.client_id != "b"]

    assert run(scenario()) == [
        ("Accepted", ""), ("Rejected", "suspended"),                  # the funder's
        ("Accepted", ""), ("Rejected", "not_a_trader"), ("Rejected", "unknown_participant"),
        ("Rejected", "unknown_participant"), ("Accepted", "")]        # the admin's


def test_a_client_id_past_its_retry_window_is_no_way_past_the_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ended order's client id stays in the engine's map after its two minutes until
    a command moves time on; let through as a retry, it placed a new order above the
    cap (found in review). The gateway asks the engine's own rule."""
    from service import gateway as gateway_module

    now = [10**18]
    monkeypatch.setattr(gateway_module.time, "time_ns", lambda: now[0])

    async def scenario() -> int:
        funder = PEOPLE[0]
        gateway, journal, [f] = _gateway_with(funder, resting_orders_per_participant=2)
        await _turns()
        segment = SEGMENTS[0]
        gateway.handle(f, _line(segment.core), 0.0)
        gateway.handle(f, _bid(segment.id, 1), 0.0)
        gateway.handle(f, b'{"type":"cancel","client_id":"b1"}', 0.0)
        gateway.handle(f, _bid(segment.id, 2), 0.0)
        gateway.handle(f, _bid(segment.id, 3), 0.0)
        journal.land()
        await _turns()
        now[0] += 121 * 10**9                           # a quiet two minutes
        gateway.handle(f, _bid(segment.id, 1), 0.0)     # b1 again: a new order now
        journal.land()
        await _turns()
        return len(gateway.engine.owned[funder.id])

    assert run(scenario()) == 2


def test_one_participant_may_ask_for_only_so_many_fills_a_second() -> None:
    """Pages were bounded in number, not in rate: one SME on four connections pulled
    155,000 fills a second, each decoded on the event loop (found in review). Each
    request counts its `limit` against the participant's 2,000 fills a second, a burst
    of 20,000; another participant is not held back."""
    from service import gateway as gateway_module
    from service.history import Page

    async def scenario() -> tuple[list[str], wire.FillPage | wire.Error]:
        gateway, _, _ = await _gateway()

        class History:
            async def page(self, participant: int, after: str | None, limit: int) -> Page:
                return Page([], False, after)

        gateway.history = History()           # type: ignore[assignment]
        hog, sme = PEOPLE[0], PEOPLE[-1]
        codes = []
        for _ in range(gateway_module.FILLS_BURST // 100 + 20):
            answer = await gateway.fill_page(hog, wire.FillsRequest(limit=100))
            codes.append(answer.code if isinstance(answer, wire.Error) else "page")
        return codes, await gateway.fill_page(sme, wire.FillsRequest(limit=100, ref="mine"))

    codes, other = run(scenario())
    pages = gateway_module.FILLS_BURST // 100
    assert pages <= codes.count("page") <= pages + 2, codes      # the burst, and a refill
    assert codes[-1] == "rate_limited" and set(codes) == {"page", "rate_limited"}
    assert isinstance(other, wire.FillPage) and other.ref == "mine"


def test_one_participants_answers_waiting_for_the_journal_take_a_tenth_at_most() -> None:
    """While a write is out, the answers held for it share `journal_backlog`: one SME
    cancelling unknown orders without end filled it, and another's ask was refused
    `unavailable` (found in review). One participant holds a tenth of it at most."""
    async def scenario() -> tuple[list[str], list[str]]:
        gateway, journal, [s, other] = _gateway_with(PEOPLE[-1], PEOPLE[-2],
                                                     journal_backlog=2000)   # 200 each
        await _turns()
        mine, theirs = _watch(s), _watch(other)
        gateway.handle(other, _subscribe(SEGMENTS[0].id), 0.0)
        gateway.handle(s, b'{"type":"cancel_all"}', 0.0)          # a write being filled
        for n in range(202):
            gateway.handle(s, b'{"type":"cancel","client_id":"none%d"}' % n, 0.0)
        gateway.handle(other, b'{"type":"cancel_all"}', 0.0)
        await _turns()
        journal.land()
        await _turns()

        def codes(sent: list[bytes]) -> list[str]:
            return [e.code if isinstance(e, wire.Rejected) else "accepted"
                    for e in _events(sent) if isinstance(e, wire.Accepted | wire.Rejected)]
        return codes(mine), codes(theirs)

    mine, theirs = run(scenario())
    assert mine == ["unavailable"] * 3 + ["accepted"] + ["unknown_order"] * 199, mine
    assert theirs == ["accepted"], theirs


def test_an_unnamed_answer_goes_to_its_sender_and_a_line_to_every_connection() -> None:
    """A command without a client id is answered on the connection that sent it only:
    a funder's second tab took the first one's `accepted` of a line for its own
    `cancel_all` (noticed before). Its other connections hear of the line by its
    `line` event, which all of them get."""
    async def scenario() -> tuple[list[wire.Event], list[wire.Event]]:
        funder = PEOPLE[0]
        gateway, journal, [one, two] = _gateway_with(funder, funder)
        await _turns()
        seen = [_watch(one), _watch(two)]
        gateway.handle(one, _line(SEGMENTS[0].core), 0.0)
        gateway.handle(two, b'{"type":"cancel_all","segment":"nowhere"}', 0.0)
        journal.land()
        await _turns()
        return _events(seen[0]), _events(seen[1])

    first, second = run(scenario())
    line = wire.LineUpdate(core=SEGMENTS[0].core, line=10**9, used=0, repaid=0,
                           reason="set")
    assert [type(e) for e in first] == [wire.Accepted, wire.LineUpdate]
    assert first[1] == line
    assert [type(e) for e in second] == [wire.LineUpdate, wire.Rejected]
    assert second[0] == line
    rejected = second[1]
    assert isinstance(rejected, wire.Rejected) and rejected.code == "unknown_segment"


def test_a_participant_hears_of_its_suspension_on_every_open_connection() -> None:
    """A page already open learned of its suspension only when its next order was
    refused (noticed before): now the `done`s of its orders, then a `suspension`,
    and a `suspension` again when it is reinstated."""
    from matcher.participants import Participant

    async def scenario() -> list[list[wire.Event]]:
        funder = PEOPLE[0]
        admin = Participant(id=1, name="Admin", role="admin", key_sha256="a")
        gateway, journal, [one, two, a] = _gateway_with(funder, funder, admin)
        await _turns()
        seen = [_watch(one), _watch(two)]
        segment = SEGMENTS[0]
        gateway.handle(one, _line(segment.core), 0.0)
        gateway.handle(one, _bid(segment.id, 1), 0.0)
        journal.land()
        await _turns()
        seen[0].clear(), seen[1].clear()
        for action in (b"suspend", b"suspend", b"reinstate"):     # the 2nd: a repeat
            gateway.handle(a, b'{"type":"%s","participant":%d}' % (action, funder.id), 0.0)
        journal.land()
        await _turns()
        return [_events(s) for s in seen]

    for events in run(scenario()):
        assert [(type(e).__name__, getattr(e, "reason", getattr(e, "suspended", None)))
                for e in events] == [("Done", "suspended"), ("SuspensionUpdate", True),
                                     ("SuspensionUpdate", False)]


def test_the_answer_to_the_gateways_own_command_goes_to_no_connection() -> None:
    """Cancel on disconnect is a `cancel_all` the gateway sends in the funder's name. A
    tab that reconnected before it was journaled got its `accepted` and pinned it on a
    line it had just set (found in review): now only the `done`s reach it."""
    async def scenario() -> list[wire.Event]:
        funder = PEOPLE[0]
        gateway, journal, [tab] = _gateway_with(funder)
        await _turns()
        segment = SEGMENTS[0]
        gateway.handle(tab, _line(segment.core), 0.0)
        gateway.handle(tab, _bid(segment.id, 1), 0.0)
        journal.land()
        await _turns()
        seen = _watch(tab)
        gateway.submit(funder, wire.CancelAll(), 0.0)       # conn None: the gateway's
        journal.land()
        await _turns()
        return _events(seen)

    events = run(scenario())
    assert [(type(e).__name__, getattr(e, "reason", None)) for e in events] == [
        ("Done", "cancelled")]


def _resting(gateway: Any, journal: Any, funder: Any, n: int, prefix: str = "r") -> str:
    """`n` bids of the funder resting in the first segment, journaled; the segment."""
    segment = sorted(gateway.engine.segments)[0]
    core = gateway.engine.segments[segment].core
    gateway.submit(funder, wire.SetCreditLine(core=core, amount=10**12), 0.0)
    for i in range(n):
        gateway.submit(funder, wire.Bid(client_id=f"{prefix}{i}", segment=segment, rate_bps=250,
                                        amount=1_000, tif="gtc"), 0.0)
    journal.land()
    return segment


def _statuses(resting: int, burst: int, times: int) -> list[wire.Event]:
    """What a funder with `resting` bids hears for `times` statuses sent at once, with a
    burst of `burst` and next to no refill."""
    async def scenario() -> list[wire.Event]:
        funder = PEOPLE[0]
        gateway, journal, [conn] = _gateway_with(funder, burst=burst, rate=0.001)
        _resting(gateway, journal, funder, resting)
        await _turns()
        sent = _watch(conn)
        for _ in range(times):
            gateway.handle(conn, b'{"type":"status"}', 0.0)
        await _turns()
        return _events(sent)
    return run(scenario())


def test_a_status_costs_a_message_more_for_every_25_orders_it_lists() -> None:
    """A `status` of 10,000 orders takes about 9 ms and 2 MB: at one message of the rate
    limit each, a burst of them stalled every client's matching (found in review)."""
    events = _statuses(resting=100, burst=202, times=45)
    statuses = [e for e in events if isinstance(e, wire.Status)]
    errors = [e for e in events if isinstance(e, wire.Error)]
    # 5 messages each: 40 of them take 200 of the 202 tokens; the 41st passes with 2
    # and leaves 3 owed, which the rest wait for.
    assert len(statuses) == 41 and len(statuses[0].orders) == 100
    assert [e.code for e in errors] == ["rate_limited"] * 4


def _reads(resting: int, burst: int, *messages: bytes) -> list[wire.Event]:
    """What an SME hears for `messages` sent at once, with `resting` bids of a funder in
    the first segment, a burst of `burst` and next to no refill."""
    async def scenario() -> list[wire.Event]:
        funder, sme = PEOPLE[0], PEOPLE[-1]
        gateway, journal, [conn] = _gateway_with(sme, burst=burst, rate=0.001)
        _resting(gateway, journal, funder, resting)
        await _turns()
        sent = _watch(conn)
        for message in messages:
            gateway.handle(conn, message, 0.0)
        await _turns()
        return _events(sent)
    return run(scenario())


def test_a_quote_costs_a_message_more_for_every_500_orders_resting_in_its_segment() -> None:
    """A quote for all a book can lend walks every bid: 5 ms with 100,000 resting, and at
    one token each a burst of them (over HTTP, anyone's) stalled every client for
    seconds (found in an audit)."""
    segment = sorted(SEGMENTS, key=lambda s: s.id)[0].id
    quote = b'{"type":"quote","segment":"%s","amount":1000000000000}' % segment.encode()
    # 1,000 resting: 3 tokens each; with 10, four pass (the fourth into debt).
    events = _reads(1_000, 10, *[quote] * 6)
    assert [type(e).__name__ for e in events] == ["Quote"] * 4 + ["Error"] * 2
    assert events[0].fillable == 1_000_000 and events[-1].code == "rate_limited"
    # An empty book costs the message alone.
    other = sorted(SEGMENTS, key=lambda s: s.id)[1].id
    empty = b'{"type":"quote","segment":"%s","amount":1000000000000}' % other.encode()
    assert [type(e).__name__ for e in _reads(1_000, 10, *[empty] * 6)] == (
        ["Quote"] * 6)


def test_a_command_costs_a_message_more_for_every_2000_orders_its_matching_visits() -> None:
    """An ask walks the bids that cannot lend (their funder's line used up): with 10,000
    of them, each of an SME's IOC asks visited them all for one token (found in an
    audit). Each costs 5 tokens more now; with a burst of 10, two pass, then
    `rate_limited`. An ask that finds a bid at once costs its token alone."""
    async def scenario(line: int) -> list[wire.Event]:
        funder, sme = PEOPLE[0], PEOPLE[-1]
        gateway, journal, [conn] = _gateway_with(sme, burst=10, rate=0.001)
        segment = _resting(gateway, journal, funder, 10_000)
        core = gateway.engine.segments[segment].core
        gateway.submit(funder, wire.SetCreditLine(core=core, amount=line), 0.0)
        journal.land()
        await _turns()
        sent = _watch(conn)
        for i in range(4):
            gateway.handle(conn, b'{"type":"ask","client_id":"a%d","segment":"%s",'
                           b'"amount":1,"tif":"ioc"}' % (i, segment.encode()), 0.0)
            journal.land()
        await _turns()
        return [e for e in _events(sent) if type(e) in (wire.Accepted, wire.Rejected)]

    def answers(events: list[wire.Event]) -> dict[str, str]:
        return {e.client_id: getattr(e, "code", "accepted")     # type: ignore[union-attr]
                for e in events}

    assert answers(run(scenario(0))) == {"a0": "accepted", "a1": "accepted",
                                         "a2": "rate_limited", "a3": "rate_limited"}
    assert answers(run(scenario(10**12))) == dict.fromkeys(("a0", "a1", "a2", "a3"),
                                                           "accepted")


def test_each_book_a_subscribe_builds_costs_a_message_and_its_walk() -> None:
    """Subscribing to every segment and unsubscribing, over and over, built every book
    for two messages."""
    ids = sorted(s.id for s in SEGMENTS)
    subscribe = _subscribe(*ids)
    unsubscribe = b'{"type":"unsubscribe","segments":[%s]}' % b",".join(
        b'"%s"' % s.encode() for s in ids)
    # 1 + (segments - 1) + 1,000 / 500 for the subscribe, 1 for the unsubscribe.
    cost = len(ids) + 2 + 1
    burst = 3 * cost
    events = _reads(1_000, burst, *[subscribe, unsubscribe] * 4)
    books = [e for e in events if isinstance(e, wire.BookUpdate)]
    assert len(books) == 3 * len(ids)
    assert [e.code for e in events if isinstance(e, wire.Error)] == ["rate_limited"] * 2


class _ClosingSocket:
    """Stands in for aiohttp's WebSocketResponse where only its close is used."""

    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def close(self, *, code: int, message: bytes, drain: bool) -> None:
        self.closed_with = code


def test_answers_queued_in_one_turn_count_against_the_outbox() -> None:
    """The outbox was checked only at each turn's write: messages read in one go, each
    answered by a large `status`, queued 96 MB in a single turn (found in review). Past
    `outbox_bytes` with what is queued, the client is dropped as a slow one, and what
    was queued is not sent; one answer alone larger than the outbox is still sent."""
    from service.gateway import CLOSE_SLOW_CONSUMER

    async def scenario() -> tuple[Any, Any, list[bytes], list[bytes]]:
        funder, other = PEOPLE[0], PEOPLE[1]
        gateway, journal, [conn, alone] = _gateway_with(funder, other, outbox_bytes=20_000)
        _resting(gateway, journal, funder, 100)      # its status: about 15 kB
        _resting(gateway, journal, other, 200)       # about 30 kB
        await _turns()
        conn.ws = _ClosingSocket()
        conn.transport.abort = lambda: None
        sent, sent_alone = _watch(conn), _watch(alone)
        for _ in range(5):
            gateway.handle(conn, b'{"type":"status"}', 0.0)
        gateway.handle(alone, b'{"type":"status"}', 0.0)
        await _turns()
        return gateway, conn, sent, sent_alone

    gateway, conn, sent, sent_alone = run(scenario())
    assert gateway.metrics.dropped == 1 and conn.closed
    assert conn.ws.closed_with == CLOSE_SLOW_CONSUMER and sent == []
    assert [len(e.orders) for e in _events(sent_alone) if isinstance(e, wire.Status)] == [200]


def test_orders_of_a_participant_gone_from_the_configuration_are_cancelled() -> None:
    """A funder removed from the configuration: its bids came back with the journal and
    went on lending, no one could cancel them, and an admin could not suspend it (found
    in review). At the start they are cancelled as its own; an admin may also suspend
    such an id while it has orders resting."""
    from matcher.participants import Directory, Participant
    from service.gateway import Gateway
    from service.metrics import Metrics

    async def scenario() -> tuple[Any, ...]:
        funder = PEOPLE[0]
        admin = Participant(id=9, name="Admin", role="admin", key_sha256="admin")
        before, journal, _ = _gateway_with(funder)
        _resting(before, journal, funder, 3)
        await _turns()
        assert before.engine.resting_count(funder.id) == 3
        # The restart: the same state, a directory without the funder.
        after = Gateway(before.engine, journal,
                        Directory([admin, *(p for p in PEOPLE if p.id != funder.id)]),
                        before.limits, Metrics())
        cancelled = after.cancel_removed()
        journal.land()
        await _turns()
        left = after.engine.resting_count(funder.id)
        _resting(after, journal, funder, 2, prefix="s")   # (as its own: a test's shortcut)
        conn = after.attach(None, _Transport(), admin)
        sent = _watch(conn)
        after.handle(conn, b'{"type":"suspend","participant":%d}' % funder.id, 0.0)
        after.handle(conn, b'{"type":"suspend","participant":424242}', 0.0)
        journal.land()
        await _turns()
        suspended = [e for e in _events(sent) if type(e) in (wire.Accepted, wire.Rejected)]
        return suspended, cancelled, left, after.engine.resting_count(funder.id)

    suspended, cancelled, left, after_suspend = run(scenario())
    assert cancelled == 1 and left == 0
    assert [type(e).__name__ for e in suspended] == ["Accepted", "Rejected"]
    assert suspended[1].code == "unknown_participant" and after_suspend == 0


def test_a_client_dropped_while_a_batch_is_delivered_costs_the_others_nothing() -> None:
    """A batch's answers go out in loops over each participant's connections (and the
    fill subscribers); a connection dropped from inside `send`, there, ended the loop,
    and the rest of the batch was never sent: here an SME's journaled ask went
    unanswered (found in review). The drop now comes in a callback of its own."""
    from service.gateway import CLOSE_SLOW_CONSUMER

    async def scenario() -> tuple[Any, Any, list[wire.Event]]:
        funder, sme = PEOPLE[0], PEOPLE[-1]
        gateway, journal, [f_conn, s_conn] = _gateway_with(funder, sme)
        segment = _resting(gateway, journal, funder, 40)
        await _turns()
        f_conn._outbox_bytes = 3_000          # `[limits] outbox_bytes`, from now on
        f_conn.ws = _ClosingSocket()
        f_conn.transport.abort = lambda: None
        _watch(f_conn)
        s_sent = _watch(s_conn)
        gateway.handle(f_conn, b'{"type":"cancel_all"}', 0.0)       # 40 `done`s: too many
        gateway.handle(s_conn, b'{"type":"ask","client_id":"a1","segment":"%s",'
                       b'"amount":500,"tif":"ioc"}' % segment.encode(), 0.0)
        journal.land()
        await _turns(5)
        return gateway, f_conn, _events(s_sent)

    gateway, f_conn, sme_heard = run(scenario())
    assert gateway.metrics.dropped == 1 and f_conn.ws.closed_with == CLOSE_SLOW_CONSUMER
    assert [type(e).__name__ for e in sme_heard] == ["Accepted", "Done"], sme_heard


def test_a_status_costing_more_than_the_burst_is_answered_and_owed() -> None:
    """With 3,000 orders resting and a burst of 100, a status costs 121 tokens, which a
    bucket of 100 never holds: it is answered, and the rest is owed (a first version
    required the cost in the bucket, and it could never be had; found in review)."""
    events = _statuses(resting=3_000, burst=100, times=2)   # the second: the bucket is empty
    assert [type(e).__name__ for e in events] == ["Status", "Error"]
    assert len(events[0].orders) == 3_000 and events[1].code == "rate_limited"


def test_a_cost_beyond_the_burst_is_owed_not_forgiven(monkeypatch: pytest.MonkeyPatch) -> None:
    """A status of many orders costs more tokens than a small burst holds. Capped at the
    burst, it was cheaper the smaller the burst (with a burst of 1, free; found in
    review): the rest is owed, and the messages after it wait."""
    from service import gateway

    now = [100.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    bucket = gateway.TokenBucket(rate=1.0, burst=2)
    assert bucket()
    bucket.owe(10)                               # 9 owed
    assert not bucket()
    now[0] += 9.5                                # 0.5 tokens: still owed
    assert not bucket()
    now[0] += 0.5
    assert bucket()                              # paid
    # Sustained: such a message (1 + 10 tokens) passes every 11 s at 1 token a second,
    # however often it is sent.
    passed = 0
    for _ in range(1100):
        now[0] += 0.1
        if bucket():
            bucket.owe(10)
            passed += 1
    assert 9 <= passed <= 11
