"""The quote board (service/static) in a real Chromium against the real service and Redis.

Every test drives the page as a user would (Playwright, Debian's Chromium, no browser
download) while other participants act over the WebSocket API from Python (the
`websockets` sync client: no event loop to share with Playwright). Funders cancel their
bids when they disconnect, so their Python clients stay open for the whole test.

Each test leaves one screenshot per page under test-output/<test name>/ (gitignored),
taken at the end of the test while the server is still up, also when the test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, WebSocketRoute, expect, sync_playwright
from websockets.sync.client import ClientConnection, connect

from tests.conftest import PARTICIPANTS, ROOT, ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
OUTPUT = ROOT / "test-output"
ADMIN, PLATFORM, F11, F12, F13, SME_X, SME_Y = 1, 2, 11, 12, 13, 21, 22
WAIT = 5.0
SEG = "DFM-30D"
DEBOUNCE_S = 0.6          # well past the page's quote debounce (200 ms)

expect.set_options(timeout=int(WAIT * 1000))


def key(pid: int) -> str:
    return PARTICIPANTS[pid][2]


def name(pid: int) -> str:
    return PARTICIPANTS[pid][0]


# --- what the page should show, computed independently --------------------------------


def cny(fen: int) -> str:
    return f"{fen // 100:,}.{fen % 100:02d} CNY"


def pct(bps: float) -> str:
    n = int(bps + 0.5)                  # half up, as the page rounds a quote's average
    return f"{n // 100}.{n % 100:02d}%"


def interest(fen: int, rate_bps: int, days: int) -> int:
    num, den = fen * rate_bps * days, 10_000 * 365
    return (2 * num + den) // (2 * den)


# --- a participant over the WebSocket API ---------------------------------------------


class WsClient:
    """One participant's connection, signed in with the first-message `auth`."""

    def __init__(self, ws: ClientConnection, pid: int) -> None:
        self.ws = ws
        self.send({"type": "auth", "key": key(pid)})
        self.welcome = self.until("welcome")
        self.seq = 0

    def send(self, msg: dict[str, Any]) -> None:
        self.ws.send(json.dumps(msg))

    def until(self, type_: str, match: Callable[[dict[str, Any]], bool] = lambda m: True,
              timeout: float = WAIT) -> dict[str, Any]:
        """The next message of this type (and match), skipping others."""
        while True:
            msg: dict[str, Any] = json.loads(self.ws.recv(timeout))
            if msg["type"] == type_ and match(msg):
                return msg

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a command; return its accepted or rejected answer."""
        self.send(msg)
        cid = msg.get("client_id")
        while True:
            got: dict[str, Any] = json.loads(self.ws.recv(WAIT))
            if got["type"] in ("accepted", "rejected") and got.get("client_id") == cid:
                return got

    def line(self, core: str, yuan: int) -> None:
        got = self.command({"type": "set_credit_line", "core": core, "amount": yuan * 100})
        assert got["type"] == "accepted", got

    def bid(self, segment: str, rate_bps: int, yuan: int) -> str:
        self.seq += 1
        cid = f"py-bid-{self.seq}"
        got = self.command({"type": "bid", "client_id": cid, "segment": segment,
                            "rate_bps": rate_bps, "amount": yuan * 100, "tif": "gtc"})
        assert got["type"] == "accepted", got
        return cid

    def quote(self, segment: str, fen: int, single_funder: bool) -> dict[str, Any]:
        self.seq += 1
        ref = f"py-q-{self.seq}"
        self.send({"type": "quote", "segment": segment, "amount": fen,
                   "single_funder": single_funder, "ref": ref})
        return self.until("quote", lambda m: m.get("ref") == ref)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """One Chromium for the module; each page gets a fresh context (its own storage).

    Debian's chromium (`./dev test` installs it); missing, this fails rather than skips.
    """
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture
def out_dir(request: pytest.FixtureRequest) -> Path:
    path = OUTPUT / re.sub(r"[^\w.-]+", "_", request.node.name).strip("_")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def clients(server: ServerProcess) -> Iterator[Callable[[int], WsClient]]:
    with ExitStack() as stack:
        yield lambda pid: WsClient(stack.enter_context(connect(server.ws_url)), pid)


@pytest.fixture
def new_page(browser: Browser, server: ServerProcess, out_dir: Path,
             clients: Callable[[int], WsClient]) -> Iterator[Callable[..., Page]]:
    """Opens pages; at teardown screenshots each, then closes it.

    It depends on `clients` so that the screenshots come before the Python funders
    disconnect (which cancels their bids) and before the server stops.
    """
    opened: list[tuple[str, Page]] = []

    def open_page(label: str, *, phone: bool = False) -> Page:
        if phone:
            context = browser.new_context(viewport={"width": 390, "height": 844},
                                          device_scale_factor=2, is_mobile=True,
                                          has_touch=True)
        else:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        opened.append((label, page))
        return page

    yield open_page
    for label, page in opened:
        try:
            page.screenshot(path=out_dir / f"{label}.png", full_page=True)
        finally:
            page.context.close()


@pytest.fixture
def market(clients: Callable[[int], WsClient]) -> tuple[WsClient, WsClient]:
    """Bank A lends up to 2M CNY at 2.50% and Bank B 500k at 2.40% in DFM-30D."""
    bank_a, bank_b = clients(F11), clients(F12)
    for bank in (bank_a, bank_b):
        bank.line("DFM", 100_000_000)
    bank_a.bid(SEG, 250, 2_000_000)
    bank_b.bid(SEG, 240, 500_000)
    return bank_a, bank_b


# --- page helpers -----------------------------------------------------------------------


def sign_in(page: Page, server: ServerProcess, pid: int) -> None:
    page.goto(f"{server.http}/")
    expect(page.locator("#workspace")).to_be_hidden()       # no board before sign-in
    page.fill("#key", key(pid))
    page.click("#signin-button")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    expect(page.locator("#cards .card")).to_have_count(4)
    expect(page.locator("#who")).to_contain_text(name(pid))


def card(page: Page, segment: str = SEG) -> Any:
    return page.locator(f'.card[data-segment="{segment}"]')


def ladder(page: Page, segment: str = SEG) -> list[tuple[str, str, str]]:
    rows = card(page, segment).locator(".level")
    return [(r.locator(".rate").inner_text(), r.locator(".amount").inner_text(),
             r.locator(".orders").inner_text()) for r in rows.all()]


def finance_from_both_banks(page: Page) -> None:
    """The SME asks for 1.2M CNY in SEG once the quote shows both banks of `market`."""
    page.select_option("#sme-segment", SEG)
    page.fill("#sme-amount", "1,200,000")
    expect(page.locator("#quote-split [data-count]")).to_have_text("2")
    page.click("#finance")


def count_sent_frames(page: Page) -> list[str]:
    """Every frame the page sends on any WebSocket, appended as it goes out."""
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on(
        "framesent", lambda payload: sent.append(payload if isinstance(payload, str)
                                                 else payload.decode())))
    return sent


def metric(server: ServerProcess, name_: str) -> float:
    status, body = server.get("/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name_))


def quote_shown(page: Page, mode: str) -> dict[str, Any]:
    """The quote the page shows, as integers/floats from its data attributes, and text."""
    box = page.locator(f"#quote-{mode}")
    return {
        "fillable": int(box.locator("[data-fen]").get_attribute("data-fen") or 0),
        "avg": float(box.locator(".kv").nth(1).locator("[data-bps]").get_attribute("data-bps")
                     or "nan"),
        "worst": int(box.locator(".kv").nth(2).locator("[data-bps]").get_attribute("data-bps")
                     or 0),
        "funders": int(box.locator("[data-count]").get_attribute("data-count") or 0),
        "text": box.inner_text(),
    }


def expect_quote_matches(page: Page, sme: WsClient, fen: int) -> None:
    """The page's two quotes equal the API's for the same amount, values and text."""
    for mode, single in (("split", False), ("single", True)):
        api = sme.quote(SEG, fen, single)
        box = page.locator(f"#quote-{mode}")
        expect(box).to_have_attribute("data-fillable", str(api["fillable"]))
        if api["fillable"] == 0:
            expect(box).to_contain_text("No ")
            continue
        shown = quote_shown(page, mode)
        assert shown["fillable"] == api["fillable"]
        assert shown["avg"] == api["avg_rate_bps"]
        assert shown["worst"] == api["worst_rate_bps"]
        assert shown["funders"] == api["funders"]
        for text in (cny(api["fillable"]), pct(api["avg_rate_bps"]),
                     pct(api["worst_rate_bps"]), str(api["funders"])):
            assert text in shown["text"], (text, shown["text"])


# --- tests ------------------------------------------------------------------------------


def test_sign_in_needs_a_valid_key(new_page: Callable[..., Page], server: ServerProcess) -> None:
    page = new_page("signin")
    page.goto(f"{server.http}/")
    page.click("#signin-button")
    expect(page.locator("#signin-msg")).to_have_text("Enter your API key.")
    page.fill("#key", "not-a-key")
    page.click("#signin-button")
    expect(page.locator("#signin-msg")).to_contain_text("This key was not accepted")
    expect(page.locator("#signin-msg")).to_contain_text("4401")
    expect(page.locator("#workspace")).to_be_hidden()
    sign_in(page, server, F12)                 # a valid key after a bad one
    expect(page.locator("#funder-panel")).to_be_visible()
    expect(page.locator("#sme-panel")).to_be_hidden()
    page.click("#sign-out")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#workspace")).to_be_hidden()


def test_funder_bid_appears_on_board_without_reload(
        new_page: Callable[..., Page], server: ServerProcess) -> None:
    board = new_page("board-sme")
    sign_in(board, server, SME_X)
    board.evaluate("window.__sameDocument = true")
    expect(card(board).locator(".best-rate")).to_have_text("—")
    expect(card(board).locator(".ladder")).to_have_text("No funder bids yet")

    funder = new_page("funder-panel")
    sign_in(funder, server, F11)
    expect(funder.locator('#lines li[data-core="DFM"]')).to_contain_text("No line")
    funder.select_option("#line-core", "DFM")
    funder.fill("#line-amount", "100000000")
    funder.click("#line-form button[type=submit]")
    expect(funder.locator("#line-msg")).to_have_text(
        "Line against DFM set to 100,000,000.00 CNY.")
    expect(funder.locator('#lines li[data-core="DFM"]')).to_contain_text(
        "100,000,000.00 CNY available")

    funder.select_option("#bid-segment", SEG)
    funder.fill("#bid-rate", "2.5")
    funder.fill("#bid-amount", "1,500,000")
    funder.check('input[name="tif"][value="gtc"]')
    funder.click("#bid-button")
    expect(funder.locator("#bid-msg")).to_contain_text("Bid placed: 1,500,000.00 CNY at 2.50%")
    expect(funder.locator("#orders .order")).to_have_count(1)
    expect(funder.locator("#orders .order")).to_contain_text("1,500,000.00 CNY resting")

    # The other page, never reloaded, shows the new level.
    expect(card(board).locator(".best-rate")).to_have_text("2.50%")
    assert ladder(board) == [("2.50%", "1,500,000.00 CNY", "1 order")]
    assert board.evaluate("window.__sameDocument") is True

    # Amend to a better rate, then cancel: the board follows each step.
    order = funder.locator("#orders .order")
    order.get_by_role("button", name="Amend").click()
    order.locator('input[name="rate"]').fill("2.40")
    order.get_by_role("button", name="Save changes").click()
    expect(order.locator(".msg")).to_have_text("Bid amended.")
    expect(order.locator(".order-main .rate")).to_have_text("2.40%")
    expect(card(board).locator(".best-rate")).to_have_text("2.40%")
    order.get_by_role("button", name="Cancel").click()
    expect(funder.locator("#orders-msg")).to_contain_text("Bid cancelled")
    expect(funder.locator("#orders .order")).to_have_count(0)
    expect(card(board).locator(".best-rate")).to_have_text("—")


def test_cancel_all_clears_the_funders_bids_and_the_board(
        new_page: Callable[..., Page], server: ServerProcess,
        clients: Callable[[int], WsClient]) -> None:
    """The panel's "Cancel all" sends one cancel_all: both of the funder's bids go, also
    the one placed from another connection, and the board shows the other funder's."""
    bank_a, bank_b = clients(F11), clients(F12)
    for bank in (bank_a, bank_b):
        bank.line("DFM", 100_000_000)
    bank_b.bid(SEG, 260, 300_000)
    funder = new_page("cancel-all")
    sent = count_sent_frames(funder)
    sign_in(funder, server, F11)
    expect(funder.locator("#cancel-all")).to_be_disabled()
    bank_a.bid(SEG, 250, 1_000_000)
    bank_a.bid("DFM-90D", 255, 2_000_000)
    expect(funder.locator("#orders .order")).to_have_count(2)   # relayed, then a status
    expect(card(funder).locator(".best-rate")).to_have_text("2.50%")
    funder.click("#cancel-all")
    expect(funder.locator("#orders-msg")).to_have_text("All resting bids cancelled.")
    expect(funder.locator("#orders .order")).to_have_count(0)
    expect(funder.locator("#orders")).to_contain_text("No resting bids.")
    expect(funder.locator("#cancel-all")).to_be_disabled()
    expect(card(funder).locator(".best-rate")).to_have_text("2.60%")
    assert [json.loads(f) for f in sent if '"cancel_all"' in f] == [{"type": "cancel_all"}]


def test_a_segment_opened_while_the_page_is_up_appears_without_reload(
        new_page: Callable[..., Page], server: ServerProcess,
        clients: Callable[[int], WsClient]) -> None:
    board = new_page("board-new-segment")
    sign_in(board, server, SME_X)
    board.evaluate("window.__sameDocument = true")
    board.select_option("#sme-segment", SEG)
    expect(board.locator("#card-DFM-60D")).to_have_count(0)
    admin = clients(ADMIN)
    admin.send({"type": "add_segment", "segment": "DFM-60D", "core": "DFM",
                "tenor_days": 60})
    assert admin.until("accepted")["client_id"] is None
    expect(card(board, "DFM-60D")).to_be_visible(timeout=20_000)   # polled every 10 s
    expect(board.locator('#sme-segment option[value="DFM-60D"]')).to_have_count(1)
    expect(board.locator("#sme-segment")).to_have_value(SEG)      # the choice is kept
    # Subscribed to it: a bid there shows at once.
    bank = clients(F11)
    bank.line("DFM", 100_000_000)
    bank.bid("DFM-60D", 255, 1_000_000)
    expect(card(board, "DFM-60D").locator(".best-rate")).to_have_text("2.55%")
    assert board.evaluate("window.__sameDocument") is True


def test_sme_quote_matches_book(new_page: Callable[..., Page], server: ServerProcess,
                                market: tuple[WsClient, WsClient],
                                clients: Callable[[int], WsClient]) -> None:
    sme = clients(SME_Y)
    page = new_page("sme-quote")
    sign_in(page, server, SME_X)
    page.select_option("#sme-segment", SEG)

    page.fill("#sme-amount", "1200000")
    expect(page.locator("#sme-amount-hint")).to_have_text("= 1,200,000.00 CNY")
    expect_quote_matches(page, sme, 120_000_000)
    split = quote_shown(page, "split")      # 500k at 2.40% + 700k at 2.50%
    assert "2.46%" in split["text"] and "2.50%" in split["text"]
    assert split["funders"] == 2
    assert quote_shown(page, "single")["funders"] == 1     # Bank A alone, at 2.50%

    # The REST quote agrees too.
    status, body = server.get(f"/v1/segments/{SEG}/quote?amount=120000000")
    assert status == 200 and json.loads(body)["fillable"] == split["fillable"]

    # More than the book holds: a partial split, and no single funder.
    page.fill("#sme-amount", "3,000,000.00")
    expect_quote_matches(page, sme, 300_000_000)
    expect(page.locator("#quote-split")).to_contain_text("2,500,000.00 CNY of 3,000,000.00 CNY")
    expect(page.locator("#quote-single")).to_have_text("No single funder can lend this amount.")

    # The quote follows the book: a new cheaper bid shows without typing anything.
    page.fill("#sme-amount", "1200000")
    expect_quote_matches(page, sme, 120_000_000)
    bank_c = clients(F13)
    bank_c.line("DFM", 10_000_000)
    bank_c.bid(SEG, 230, 300_000)
    expect(page.locator("#quote-split [data-count]")).to_have_text("3")
    expect_quote_matches(page, sme, 120_000_000)
    page.locator("#sme-amount").blur()
    expect(page.locator("#sme-amount")).to_have_value("1,200,000.00")


def test_finance_now_shows_fills_and_board_updates(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient], clients: Callable[[int], WsClient]) -> None:
    bank_a, bank_b = market
    observer = new_page("board-observer")
    sign_in(observer, server, SME_Y)
    page = new_page("sme-finance")
    sign_in(page, server, SME_X)
    for p in (page, observer):
        expect(card(p).locator(".best-rate")).to_have_text("2.40%")
        expect(card(p).locator(".fills")).to_contain_text("None today")
    assert ladder(observer) == [("2.40%", "500,000.00 CNY", "1 order"),
                                ("2.50%", "2,000,000.00 CNY", "1 order")]

    finance_from_both_banks(page)

    expect(page.locator("#outcome")).to_have_text("Filled")
    loans = page.locator("#sme-result tr.loan")
    expect(loans).to_have_count(2)
    rows = [(r.locator(".funder").inner_text(), r.locator(".rate").inner_text(),
             r.locator(".amount").inner_text().splitlines()[0]) for r in loans.all()]
    assert rows == [(name(F12), "2.40%", "500,000.00 CNY"), (name(F11), "2.50%", "700,000.00 CNY")]
    total_interest = interest(50_000_000, 240, 30) + interest(70_000_000, 250, 30)
    assert total_interest == 242_466                    # 986.30 + 1,438.36 CNY
    expect(page.locator("#total-financed")).to_have_text("1,200,000.00 CNY")
    expect(page.locator("#total-interest")).to_have_text(cny(total_interest))
    expect(page.locator("#sme-result")).to_contain_text("interest 986.30 CNY")

    # Both boards: Bank B's level is gone, Bank A's shrank, the fills are listed.
    for p in (page, observer):
        expect(card(p).locator(".best-rate")).to_have_text("2.50%")
        expect(card(p).locator(".level")).to_have_count(1)
        expect(card(p).locator(".fills li")).to_have_count(2)
    assert ladder(observer) == [("2.50%", "1,300,000.00 CNY", "1 order")]
    fills = [li.inner_text() for li in card(observer).locator(".fills li").all()]
    assert fills == ["2.50% 700,000.00 CNY", "2.40% 500,000.00 CNY"]    # newest first
    assert name(F11) not in card(observer).inner_text()      # the board names nobody

    # The quote on screen follows: the same amount now comes from Bank A alone.
    expect(page.locator("#quote-split [data-count]")).to_have_text("1")
    expect(page.locator("#quote-split")).to_contain_text("2.50%")

    # The funders got the same loans.
    assert bank_b.until("fill")["amount"] == 50_000_000
    assert bank_a.until("fill")["amount"] == 70_000_000


def test_a_reloaded_sme_page_lists_its_latest_loans(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient]) -> None:
    page = new_page("sme-loans-after-reload")
    sign_in(page, server, SME_X)
    expect(page.locator("#loans")).to_be_hidden()             # none yet
    finance_from_both_banks(page)
    expect(page.locator("#outcome")).to_have_text("Filled")
    expected = [("700,000.00 CNY", "2.50%", f"{name(F11)} · {SEG}"),     # newest first
                ("500,000.00 CNY", "2.40%", f"{name(F12)} · {SEG}")]
    expect(page.locator("#loan-list li")).to_have_count(2)
    assert loan_rows(page) == expected

    page.reload()
    sign_in(page, server, SME_X)
    expect(page.locator("#loan-list li")).to_have_count(2)
    assert loan_rows(page) == expected
    expect(page.locator("#sme-result")).to_be_hidden()         # no ask on this page yet


def loan_rows(page: Page) -> list[tuple[str, str, str]]:
    return [(li.locator(".amount").inner_text(), li.locator(".rate").inner_text(),
             li.locator(".who").inner_text()) for li in page.locator("#loan-list li").all()]


class Switch:
    """The page's WebSockets through a switch the test flips: `drop` closes the page's
    connection, and those it opens next are never answered (it keeps trying); `restore`
    waits for its next try and lets that one through to the server. `sent` gets every
    message the page sends to the server."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.away = False
        self.sockets: list[WebSocketRoute] = []
        self.sent: list[dict[str, Any]] = []
        self.tries = 0                  # connections the page had made when dropped
        page.route_web_socket(re.compile(r".*/ws$"), self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        self.sockets.append(ws)
        if self.away:
            return                  # a mock that never answers the sign-in
        server_ws = ws.connect_to_server()

        def outgoing(message: str | bytes) -> None:
            self.sent.append(json.loads(message))
            server_ws.send(message)
        ws.on_message(outgoing)

    def drop(self) -> None:
        self.away = True
        self.tries = len(self.sockets)
        self.sockets[-1].close()
        expect(self.page.locator("#live")).to_have_attribute("data-state", "reconnecting")

    def restore(self) -> None:
        deadline = time.monotonic() + WAIT
        while len(self.sockets) <= self.tries:
            assert time.monotonic() < deadline, "the page did not try to reconnect"
            self.page.wait_for_timeout(50)
        self.away = False
        self.sockets[-1].close()        # the page tries again, this time to the server
        expect(self.page.locator("#live")).to_have_attribute("data-state", "live",
                                                             timeout=10_000)


def test_a_funder_page_that_lost_its_connection_catches_up_on_its_loans(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient], clients: Callable[[int], WsClient]) -> None:
    """Bank A's page loses its connection; a loan is made meanwhile (Bank A's Python
    client keeps its bid resting); once back, the page lists it, newest first, and each
    loan once."""
    page = new_page("funder-catch-up")
    switch = Switch(page)
    sign_in(page, server, F11)
    expect(page.locator("#loans")).to_be_hidden()
    sme = clients(SME_X)

    def borrow(yuan: int) -> None:
        sme.seq += 1
        got = sme.command({"type": "ask", "client_id": f"py-ask-{sme.seq}", "segment": SEG,
                           "amount": yuan * 100, "max_rate_bps": 250, "tif": "ioc"})
        assert got["type"] == "accepted", got

    borrow(600_000)                     # 500k from Bank B at 2.40%, 100k from Bank A
    first = ("100,000.00 CNY", "2.50%", f"to SME {SME_X} · {SEG}")
    expect(page.locator("#loan-list li")).to_have_count(1)
    assert loan_rows(page) == [first]

    switch.drop()
    borrow(300_000)
    switch.restore()
    expect(page.locator("#loan-list li")).to_have_count(2)
    assert loan_rows(page) == [("300,000.00 CNY", "2.50%", f"to SME {SME_X} · {SEG}"), first]
    asked = [m for m in switch.sent if m["type"] == "fills"]
    assert asked == [{"type": "fills", "limit": 5, "ref": "loans"}] * 2   # sign-in, return


def test_a_repayment_frees_the_funders_line_on_its_page(
        new_page: Callable[..., Page], server: ServerProcess,
        clients: Callable[[int], WsClient]) -> None:
    """The platform's `repay` is not the funder's own command: the page hears of it
    through the `line` event, says so, and shows the line freed."""
    bank_a = clients(F11)
    bank_a.line("DFM", 1_000_000)
    bank_a.bid(SEG, 250, 2_000_000)
    page = new_page("funder-repaid")
    sign_in(page, server, F11)
    line = page.locator('#lines li[data-core="DFM"]')
    expect(line).to_contain_text("1,000,000.00 CNY available")
    sme = clients(SME_X)
    got = sme.command({"type": "ask", "client_id": "py-ask-1", "segment": SEG,
                       "amount": 1_000_000 * 100, "tif": "ioc"})
    assert got["type"] == "accepted", got
    expect(line).to_contain_text("0.00 CNY available")
    expect(line).to_contain_text("1,000,000.00 CNY used of 1,000,000.00 CNY")
    platform = clients(PLATFORM)
    got = platform.command({"type": "repay", "funder": F11, "core": "DFM",
                            "repaid_total": 400_000 * 100})
    assert got == {"type": "accepted", "client_id": None, "seq": got["seq"],
                   "order_id": None, "duplicate": False}
    expect(line).to_contain_text("400,000.00 CNY available")
    expect(line).to_contain_text(
        "600,000.00 CNY used of 1,000,000.00 CNY · 400,000.00 CNY repaid so far")
    expect(page.locator("#activity")).to_contain_text(
        "Repaid against DFM: 400,000.00 CNY in all; 400,000.00 CNY of the line free to lend")
    # A line the funder sets elsewhere (here its Python client) shows at once as well.
    bank_a.line("DFM", 2_000_000)
    expect(line).to_contain_text("1,400,000.00 CNY available")
    expect(page.locator("#activity")).to_contain_text(
        "Line against DFM set to 2,000,000.00 CNY in another session")
    page.select_option("#line-core", "DFM")        # one it sets itself says so once
    page.fill("#line-amount", "2500000")
    page.click("#line-form button[type=submit]")
    expect(page.locator("#line-msg")).to_have_text("Line against DFM set to 2,500,000.00 CNY.")
    expect(line).to_contain_text("1,900,000.00 CNY available")
    expect(page.locator("#activity p", has_text="in another session")).to_have_count(1)


def test_a_halted_segment_shows_halted_to_the_sme(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient], clients: Callable[[int], WsClient]) -> None:
    """An admin halts the segment: its card says so at once (the funders' bids ended),
    the SME's quote and its "Finance now" say why nothing can be lent (no ask is sent),
    and after `reopen` it is an empty market."""
    page = new_page("sme-halted")
    sent = count_sent_frames(page)
    sign_in(page, server, SME_X)
    funder_page = new_page("funder-halted")
    sign_in(funder_page, server, F11)
    expect(card(page).locator(".level")).to_have_count(2)
    page.select_option("#sme-segment", SEG)
    page.fill("#sme-amount", "100,000")
    expect(page.locator("#quote-split [data-count]")).to_have_text("1")   # Bank B
    admin = clients(ADMIN)
    assert admin.command({"type": "halt", "segment": SEG})["type"] == "accepted"
    expect(card(page).locator(".ladder")).to_have_text("Trading halted")
    expect(card(page)).to_have_attribute("data-halted", "")
    expect(card(page, "DFM-90D").locator(".ladder")).to_have_text("No funder bids yet")
    page.click("#finance")            # at once: the quote on screen may predate the halt
    halted = f"Trading in {SEG} is halted: no loans until it reopens."
    expect(page.locator("#sme-msg")).to_have_text(halted)
    expect(page.locator("#quote-split")).to_contain_text(halted)
    page.wait_for_timeout(DEBOUNCE_S * 1000)
    kinds = [json.loads(f)["type"] for f in sent]
    assert "quote" in kinds and "ask" not in kinds      # counted, and nothing asked
    # Bank A's page says why its bid (kept by its Python client) is gone.
    expect(funder_page.locator("#activity")).to_contain_text(
        "Bid ended, trading in its segment was halted: 2,000,000.00 CNY withdrawn")
    assert admin.command({"type": "reopen", "segment": SEG})["type"] == "accepted"
    expect(card(page).locator(".ladder")).to_have_text("No funder bids yet")
    expect(card(page)).not_to_have_attribute("data-halted", "")
    expect(page.locator("#sme-msg")).to_have_text("")     # the halt's note is gone


def test_a_suspended_funder_is_told_why_its_bids_ended_and_new_ones_are_refused(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient], clients: Callable[[int], WsClient]) -> None:
    """An open page is told at once, sends no bid while suspended, and is told of its
    reinstatement; a page signing in is told before it tries."""
    page = new_page("funder-suspended")
    sent = count_sent_frames(page)
    sign_in(page, server, F11)
    expect(page.locator("#orders li:not(.empty)")).to_have_count(1)   # Bank A's, from Python
    admin = clients(ADMIN)
    assert admin.command({"type": "suspend", "participant": F11})["type"] == "accepted"
    expect(page.locator("#activity")).to_contain_text(
        "Bid ended, an admin suspended your trading: 2,000,000.00 CNY withdrawn")
    expect(page.locator("#orders")).to_have_text("No resting bids.")
    suspended = "An admin has suspended your trading: contact the platform."
    expect(page.locator("#bid-msg")).to_have_text(suspended)          # before it tries
    page.select_option("#bid-segment", SEG)
    page.fill("#bid-rate", "2.50")
    page.fill("#bid-amount", "1000")
    page.click("#bid-button")
    expect(page.locator("#bid-msg")).to_have_text(suspended)
    assert admin.command({"type": "reinstate", "participant": F11})["type"] == "accepted"
    expect(page.locator("#bid-msg")).to_have_text(
        "An admin has reinstated your trading: you may place orders again.")
    assert not [f for f in sent if json.loads(f)["type"] == "bid"]   # none while suspended
    page.click("#bid-button")
    expect(page.locator("#bid-msg")).to_have_text(re.compile("^Bid placed: "))
    assert admin.command({"type": "suspend", "participant": F11})["type"] == "accepted"
    sign_in(page, server, F11)                 # a fresh page is told before it tries
    expect(page.locator("#bid-msg")).to_have_text(
        "An admin has suspended your trading: contact the platform.")
    sme_page = new_page("sme-suspended")       # and so is an SME's
    clients(ADMIN).command({"type": "suspend", "participant": SME_X})
    sign_in(sme_page, server, SME_X)
    expect(sme_page.locator("#sme-msg")).to_have_text(
        "An admin has suspended your trading: contact the platform.")


def test_finance_more_than_the_book_is_partly_filled(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient]) -> None:
    page = new_page("sme-partial")
    sign_in(page, server, SME_X)
    page.select_option("#sme-segment", SEG)
    page.fill("#sme-amount", "3000000")
    expect(page.locator("#quote-split")).to_contain_text("2,500,000.00 CNY of 3,000,000.00 CNY")
    page.click("#finance")
    expect(page.locator("#outcome")).to_have_text("Partly filled")
    expect(page.locator("#sme-result tr.loan")).to_have_count(2)
    expect(page.locator("#total-financed")).to_have_text("2,500,000.00 CNY")
    expect(page.locator("#total-interest")).to_have_text(
        cny(interest(50_000_000, 240, 30) + interest(200_000_000, 250, 30)))
    # The book is empty now: the page says so instead of sending an ask bound to fail.
    expect(card(page).locator(".ladder")).to_have_text("No funder bids yet")
    expect(page.locator("#quote-split")).to_have_text(
        "No funder can lend in this segment right now.")
    page.click("#finance")
    expect(page.locator("#sme-msg")).to_have_text("No funder can lend in this segment right now.")
    expect(page.locator("#outcome")).to_have_text("Partly filled")


BAD_AMOUNTS = {
    "decimals": ("12.345", "Amount: at most 2 decimals."),
    "zero": ("0", "Amount: must be greater than zero."),
    "zero-fen": ("0.00", "Amount: must be greater than zero."),
    "empty": ("", "Amount: enter a value."),
    "letters": ("abc", "Amount: not a number."),
    "negative": ("-5", "Amount: must be greater than zero."),
    "two-points": ("1.2.3", "Amount: not a number."),
}


@pytest.mark.parametrize("typed, message", BAD_AMOUNTS.values(), ids=BAD_AMOUNTS.keys())
def test_bad_amount_shows_message_and_sends_nothing(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient], typed: str, message: str) -> None:
    page = new_page("sme-bad-amount")
    sent = count_sent_frames(page)
    sign_in(page, server, SME_X)
    page.wait_for_timeout(DEBOUNCE_S * 1000)
    assert [json.loads(f)["type"] for f in sent] == ["auth", "fills", "subscribe", "status"]

    # The counter does see frames: a good amount sends its two quotes, exact to the fen.
    page.fill("#sme-amount", "1,000.29")
    expect(page.locator("#quote-split [data-count]")).to_have_text("1")
    quotes_sent = [json.loads(f) for f in sent[4:]]
    assert [(q["type"], q["amount"], q["single_funder"]) for q in quotes_sent] == [
        ("quote", 100_029, False), ("quote", 100_029, True)]
    before = len(sent)
    commands, quotes = metric(server, "matcher_commands_total"), metric(server, "matcher_quotes")

    page.fill("#sme-amount", typed)
    page.click("#finance")
    expect(page.locator("#sme-msg")).to_have_text(message)
    expect(page.locator("#quote-split")).to_have_text("Enter an amount")   # the old quote goes
    page.wait_for_timeout(DEBOUNCE_S * 1000)
    assert len(sent) == before, sent[before:]
    assert metric(server, "matcher_commands_total") == commands
    assert metric(server, "matcher_quotes") == quotes
    expect(page.locator("#sme-result")).to_be_hidden()
    expect(page.locator("#sme-msg")).to_have_text(message)


def test_bad_bid_is_stopped_and_server_rejections_are_shown(
        new_page: Callable[..., Page], server: ServerProcess,
        clients: Callable[[int], WsClient]) -> None:
    page = new_page("funder-bad-bid")
    sent = count_sent_frames(page)
    sign_in(page, server, F13)
    page.select_option("#bid-segment", SEG)
    page.fill("#bid-rate", "2.50")
    page.fill("#bid-amount", "1000")
    page.click("#bid-button")
    expect(page.locator("#bid-msg")).to_have_text("Set a credit line against DFM first.")

    # A line set elsewhere (same funder, another connection) reaches the page.
    clients(F13).line("DFM", 1_000_000)
    expect(page.locator('#lines li[data-core="DFM"]')).to_contain_text("1,000,000.00 CNY available")
    page.wait_for_timeout(300)
    before = len(sent)
    for rate, amount, message in [
        ("2.555", "1000", "Rate: at most 2 decimals."),
        ("", "1000", "Rate: enter a value."),
        ("abc", "1000", "Rate: not a number."),
        ("0", "1000", "Rate: must be greater than zero."),
        ("36.01", "1000", "Rate: at most 36.00% in this segment."),
        ("2.50", "0", "Amount: must be greater than zero."),
        ("2.50", "-1", "Amount: must be greater than zero."),
        ("2.50", "10.001", "Amount: at most 2 decimals."),
    ]:
        page.fill("#bid-rate", rate)
        page.fill("#bid-amount", amount)
        page.click("#bid-button")
        expect(page.locator("#bid-msg")).to_have_text(message)
    assert len(sent) == before, sent[before:]

    # More than the line leaves is a bid the server takes: it lends what the line allows
    # (the board refused it, and refused amends down to less than that too).
    page.fill("#bid-rate", "2.50")
    page.fill("#bid-amount", "1,500,000")
    page.click("#bid-button")
    expect(page.locator("#bid-msg")).to_have_text(
        "Bid placed: 1,500,000.00 CNY at 2.50% in DFM · 30 days. Your line against DFM has "
        "1,000,000.00 CNY free: the bid lends up to that now, the rest as repayments free it.")
    order = page.locator("#orders .order")
    order.locator(".amend-toggle").click()
    order.locator("input[name=amount]").fill("1,200,000")
    order.locator("form.amend button[type=submit]").click()
    expect(order.locator(".msg")).to_contain_text("Bid amended. Your line against DFM has")
    expect(order.locator(".order-sub")).to_contain_text("1,200,000.00 CNY resting")
    page.click("#cancel-all")
    expect(page.locator("#orders .order")).to_have_count(0)

    # What the server refuses is shown with its code and message. The page never sends a
    # rate over the cap, so a route rewrites one bid on its way out.
    def tamper(ws: WebSocketRoute) -> None:
        server_ws = ws.connect_to_server()

        def outgoing(message: str | bytes) -> None:
            msg = json.loads(message)
            if msg.get("type") == "bid" and msg["amount"] == 77_700:
                msg["surprise"] = 1             # not in the protocol: an `error` event
            elif msg.get("type") == "bid":
                msg["rate_bps"] = 9_999         # over the cap: a `rejected` event
            server_ws.send(json.dumps(msg))
        ws.on_message(outgoing)

    page.route_web_socket(re.compile(r".*/ws$"), tamper)
    page.reload()
    page.fill("#key", key(F13))
    page.click("#signin-button")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    page.select_option("#bid-segment", SEG)
    page.fill("#bid-rate", "2.50")
    page.fill("#bid-amount", "1000")
    page.click("#bid-button")
    expect(page.locator("#bid-msg")).to_have_text(
        "Rejected (out_of_range): rate_bps: must be in [0, 3600], got 9999")
    expect(page.locator("#notice")).to_be_hidden()
    page.fill("#bid-amount", "777")
    page.click("#bid-button")
    expect(page.locator("#notice")).to_be_visible()
    expect(page.locator("#notice-text")).to_contain_text(
        "Error (invalid): Object contains unknown field `surprise`")
    expect(page.locator("#bid-msg")).to_contain_text("Error (invalid)")
    expect(page.locator("#orders .order")).to_have_count(0)


def test_usable_on_a_phone(new_page: Callable[..., Page], server: ServerProcess,
                           market: tuple[WsClient, WsClient]) -> None:
    sme = new_page("phone-sme", phone=True)
    funder = new_page("phone-funder", phone=True)
    for page, pid in ((sme, SME_X), (funder, F11)):
        page.goto(f"{server.http}/")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        sign_in(page, server, pid)
    sme.select_option("#sme-segment", SEG)
    sme.fill("#sme-amount", "1,200,000")
    expect(sme.locator("#quote-split [data-count]")).to_have_text("2")
    sme.click("#finance")
    expect(sme.locator("#outcome")).to_have_text("Filled")
    expect(funder.locator("#orders .order")).to_have_count(1)
    funder.locator("#orders .order").get_by_role("button", name="Amend").click()
    for page in (sme, funder):
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        # Nothing is cut off inside either: every element ends within the viewport.
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter((e) => e.getClientRects().length && e.getBoundingClientRect().right > 390.5)
            .map((e) => e.tagName + '.' + e.className)""")
        assert wide == []


def test_board_reconnects_after_a_server_restart(
        new_page: Callable[..., Page], server: ServerProcess,
        clients: Callable[[int], WsClient]) -> None:
    page = new_page("board-reconnect")
    sign_in(page, server, SME_X)
    page.evaluate("window.__sameDocument = true")
    assert server.terminate() == 0
    expect(page.locator("#live")).to_have_attribute("data-state", "reconnecting")
    server.start()
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=20_000)
    bank = clients(F11)
    bank.line("SGCC", 5_000_000)
    bank.bid("SGCC-90D", 310, 250_000)
    expect(card(page, "SGCC-90D").locator(".best-rate")).to_have_text("3.10%")
    assert ladder(page, "SGCC-90D") == [("3.10%", "250,000.00 CNY", "1 order")]
    assert page.evaluate("window.__sameDocument") is True


# --- what a dropped connection or a busy market must not break (found in review) --------


def _answers_lost_after_the_ask(sockets: list[WebSocketRoute], asks: list[str],
                                reads: list[dict[str, Any]] | None = None,
                                cap: int | None = None) -> Callable[[WebSocketRoute], None]:
    """A route for the page's WebSockets: on the first, nothing comes back once the page
    sent its ask, as if the connection died with the answers on their way; later ones
    pass everything. `asks` gets the asks' client ids, `reads` the page's `ask-check`
    reads; `cap` rewrites the ask's `max_rate_bps` on its way out."""
    def route(ws: WebSocketRoute) -> None:
        sockets.append(ws)
        server_ws = ws.connect_to_server()
        first = len(sockets) == 1

        def outgoing(message: str | bytes) -> None:
            msg = json.loads(message)
            if msg["type"] == "ask":
                asks.append(msg["client_id"])
                if cap is not None:
                    message = json.dumps({**msg, "max_rate_bps": cap})
            if reads is not None and msg["type"] == "fills" and msg["ref"] == "ask-check":
                reads.append(msg)
            server_ws.send(message)

        def incoming(message: str | bytes) -> None:
            if not (first and asks):               # after the ask: nothing gets back
                ws.send(message)
        ws.on_message(outgoing)
        server_ws.on_message(incoming)
    return route


def test_an_ask_whose_answers_were_lost_with_the_connection_is_read_back_not_resent(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient]) -> None:
    """The ask reaches the gateway and is filled, but every answer is lost with the
    connection ("Finance now" stayed locked for good). Back, the page does not send it
    again (past two minutes the same client id would borrow twice): it
    reads its loans back by client id. One financing, shown as filled, and the SME can
    finance again."""
    bank_a, bank_b = market
    sockets: list[WebSocketRoute] = []
    asks: list[str] = []
    page = new_page("sme-ask-lost")
    page.route_web_socket(re.compile(r".*/ws$"), _answers_lost_after_the_ask(sockets, asks))
    sign_in(page, server, SME_X)
    finance_from_both_banks(page)
    assert bank_b.until("fill")["amount"] == 50_000_000       # the gateway filled it
    assert bank_a.until("fill")["amount"] == 70_000_000
    expect(page.locator("#outcome")).to_have_text("Processing…")
    expect(page.locator("#finance")).to_be_disabled()
    sockets[0].close(code=1001)
    expect(page.locator("#outcome")).to_have_text("Filled", timeout=10_000)
    expect(page.locator("#sme-result tr.loan")).to_have_count(2)
    expect(page.locator("#total-financed")).to_have_text("1,200,000.00 CNY")
    expect(page.locator("#finance")).to_be_enabled()
    assert len(asks) == 1, asks                                  # never sent again
    assert ladder(page) == [("2.50%", "1,300,000.00 CNY", "1 order")]   # lent once


@pytest.mark.parametrize("filled", [True, False])
def test_a_lost_ask_is_read_back_past_the_loans_made_after_it(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient], clients: Callable[[int], WsClient],
        filled: bool) -> None:
    """As above, but the SME borrows 110 times more (from another client) before the
    page is back: its ask's two loans are no longer among the latest 100, and the page
    read "Unfilled" for an ask that was filled. It reads the loans made after the
    newest book it had seen instead, page by page: past the ask's loans, or, for an
    ask that lent nothing (capped below every bid here), to the end."""
    sockets: list[WebSocketRoute] = []
    asks: list[str] = []
    reads: list[dict[str, Any]] = []
    page = new_page(f"sme-ask-lost-far-{filled}")
    page.route_web_socket(re.compile(r".*/ws$"), _answers_lost_after_the_ask(
        sockets, asks, reads, cap=None if filled else 200))
    sign_in(page, server, SME_X)
    finance_from_both_banks(page)
    bank_a, bank_b = market
    if filled:
        assert bank_b.until("fill")["amount"] == 50_000_000
        assert bank_a.until("fill")["amount"] == 70_000_000
    other = clients(SME_X)
    for n in range(110):
        got = other.command({"type": "ask", "client_id": f"py-more-{n}", "segment": SEG,
                             "amount": 1_000_000, "max_rate_bps": 250, "tif": "ioc"})
        assert got["type"] == "accepted", got
    sockets[0].close(code=1001)
    expect(page.locator("#outcome")).to_have_text("Filled" if filled else "Unfilled",
                                                  timeout=10_000)
    expect(page.locator("#sme-result tr.loan")).to_have_count(2 if filled else 0)
    expect(page.locator("#total-financed")).to_have_text(
        "1,200,000.00 CNY" if filled else "0.00 CNY")
    expect(page.locator("#finance")).to_be_enabled()
    assert len(asks) == 1, asks
    # After the book it had seen; to the end (two pages) only when nothing was found. (A
    # read sent while the page's latest loans are read is `busy`, and sent again.)
    assert len({r["after"] for r in reads}) == (1 if filled else 2), reads
    assert all(r.get("after") not in (None, "0-0") for r in reads), reads


def test_finance_now_while_offline_sends_nothing_then_or_later(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient]) -> None:
    """"Finance now" while the page reconnects: it says so and nothing goes out, then
    or once the page is back. It had kept the ask (shown "Unfilled" after the
    reconnect, and every later click ignored), and a click without a quote on screen
    financed by itself once the page was back (found in review)."""
    page = new_page("sme-offline-finance")
    switch = Switch(page)
    sign_in(page, server, SME_X)
    page.select_option("#sme-segment", SEG)
    page.fill("#sme-amount", "1,200,000")
    expect(page.locator("#quote-split [data-count]")).to_have_text("2")
    switch.drop()
    page.click("#finance")                    # with the quote from before
    expect(page.locator("#notice-text")).to_contain_text("Not connected")
    page.click("#notice-close")
    page.fill("#sme-amount", "300,000")       # no quote for this one: none can come
    page.click("#finance")
    expect(page.locator("#sme-msg")).to_contain_text("Not connected")
    expect(page.locator("#notice")).to_be_hidden()    # the quotes while typing: quiet
    switch.restore()
    expect(page.locator("#quote-split [data-count]")).to_have_text("1")   # 300k: Bank B
    page.wait_for_timeout(500)
    assert [m for m in switch.sent if m["type"] == "ask"] == []
    expect(page.locator("#sme-result")).to_be_hidden()
    expect(page.locator("#finance")).to_be_enabled()
    page.click("#finance")                    # and now it goes
    expect(page.locator("#outcome")).to_have_text("Filled")
    assert [m["amount"] for m in switch.sent if m["type"] == "ask"] == [30_000_000]


def test_a_funders_bids_cancelled_on_disconnect_are_not_shown_resting_meanwhile(
        new_page: Callable[..., Page], server: ServerProcess) -> None:
    """The page was the funder's last connection: when it drops, cancel on disconnect
    ends the bids and their `done`s are lost with it. The list stayed as it was, with
    live buttons, and then emptied without a word (found in review). Now it says what
    may happen, and once back, which bids ended meanwhile."""
    page = new_page("funder-cancel-on-disconnect")
    switch = Switch(page)
    sign_in(page, server, F13)
    page.select_option("#line-core", "DFM")
    page.fill("#line-amount", "1,000,000")
    page.click("#line-form button[type=submit]")
    expect(page.locator('#lines li[data-core="DFM"]')).to_contain_text("available")
    page.select_option("#bid-segment", SEG)
    page.fill("#bid-rate", "2.45")
    page.fill("#bid-amount", "400,000")
    page.click("#bid-button")
    expect(page.locator("#orders .order")).to_have_count(1)
    switch.drop()
    expect(page.locator("#orders-msg")).to_contain_text("cancel on disconnect")
    expect(page.locator("#orders .order .cancel")).to_be_disabled()
    expect(page.locator("#cancel-all")).to_be_disabled()
    switch.restore()
    expect(page.locator("#orders")).to_contain_text("No resting bids.")
    expect(page.locator("#activity")).to_contain_text(
        "Bid at 2.45% in DFM · 30 days (400,000.00 CNY resting) ended while the connection "
        "was down: cancelled when the connection dropped (cancel on disconnect)")
    expect(page.locator("#orders-msg")).to_have_text(
        "1 bid ended while the connection was down: see Activity.")


def test_the_quote_is_sent_while_the_book_keeps_moving(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient]) -> None:
    """Each book update of the SME's segment asks for a fresh quote after 200 ms; with an
    update every 50 ms that must not postpone the quote for ever (it did: "Quoting…")."""
    bank_a, _ = market
    page = new_page("sme-busy-book")
    sign_in(page, server, SME_X)
    page.select_option("#sme-segment", SEG)
    bid = bank_a.bid(SEG, 260, 1_000_000)
    page.fill("#sme-amount", "100,000")
    shown = None
    deadline = time.monotonic() + 2.0
    rate = 260
    while time.monotonic() < deadline:          # the book moves every 50 ms meanwhile
        rate = 261 if rate == 260 else 260
        got = bank_a.command({"type": "amend", "client_id": bid, "rate_bps": rate})
        assert got["type"] == "accepted", got
        time.sleep(0.02)
        shown = page.locator("#quote-split").get_attribute("data-fillable") or shown
    assert shown == "10000000", shown


def test_an_error_about_a_read_does_not_settle_the_ask(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient]) -> None:
    """An `error` that answers a quote (its `ref` says so) or another read (a status or
    a subscription over the rate: no client id, no ref) came right after the ask was
    sent, and the page took it as the ask's: "Rejected", the button free, while the ask
    went on to be filled (and a second click would have borrowed again)."""
    def route(ws: WebSocketRoute) -> None:
        server_ws = ws.connect_to_server()

        def outgoing(message: str | bytes) -> None:
            server_ws.send(message)
            if json.loads(message)["type"] == "ask":
                ws.send(json.dumps({"type": "error", "code": "rate_limited", "path": None,
                                    "message": "over the rate", "ref": "q9-split"}))
                # ... and a read's (a status over the rate: no client id, no ref)
                ws.send(json.dumps({"type": "error", "code": "rate_limited", "path": None,
                                    "message": "over the rate", "ref": None,
                                    "client_id": None}))
        ws.on_message(outgoing)

    page = new_page("sme-quote-error")
    page.route_web_socket(re.compile(r".*/ws$"), route)
    sign_in(page, server, SME_X)
    finance_from_both_banks(page)
    expect(page.locator("#outcome")).to_have_text("Filled")
    expect(page.locator("#sme-result tr.loan")).to_have_count(2)
    expect(page.locator("#sme-msg")).to_contain_text("Quote: Error (rate_limited)")


def test_books_from_a_gateway_that_numbers_from_lower_are_shown(
        new_page: Callable[..., Page], server: ServerProcess,
        market: tuple[WsClient, WsClient]) -> None:
    """A newer book is newer within one connection: after reconnecting to a gateway whose
    `seq` is lower (a Redis emptied or failed over), the board must not keep the old
    picture for ever. The first connection's books are made to carry high numbers."""
    bank_a, _ = market
    sockets: list[WebSocketRoute] = []

    def route(ws: WebSocketRoute) -> None:
        sockets.append(ws)
        server_ws = ws.connect_to_server()
        first = len(sockets) == 1

        def incoming(message: str | bytes) -> None:
            msg = json.loads(message)
            if first and msg["type"] == "book":
                msg["seq"] += 1_000_000
            ws.send(json.dumps(msg))
        server_ws.on_message(incoming)

    page = new_page("board-seq-restart")
    page.route_web_socket(re.compile(r".*/ws$"), route)
    sign_in(page, server, SME_Y)
    expect(card(page).locator(".best-rate")).to_have_text("2.40%")
    sockets[0].close(code=1001)
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=10_000)
    bank_a.bid(SEG, 230, 100_000)
    expect(card(page).locator(".best-rate")).to_have_text("2.30%")


def test_segments_shown_as_stand_ins_are_replaced_once_readable(
        new_page: Callable[..., Page], server: ServerProcess) -> None:
    """`/v1/segments` fails at sign-in: the page shows the ids it was welcomed with as
    stand-ins (no core, no tenor). They are replaced once the list can be read, not only
    segments it did not know."""
    calls: list[int] = []

    def segments(route: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            route.fulfill(status=503, json={"type": "error", "code": "unavailable"})
        else:
            route.continue_()

    page = new_page("board-segments-later")
    page.route(re.compile(r".*/v1/segments$"), segments)
    sign_in(page, server, SME_Y)
    expect(card(page).locator("h3")).to_have_text("DFM 30 days")
    assert len(calls) >= 2


def test_a_refusal_ahead_of_an_earlier_answer_is_pinned_on_the_latest_command(
        new_page: Callable[..., Page], server: ServerProcess) -> None:
    """`set_credit_line` and `cancel_all` carry no client id, so the page pins their
    answers oldest first; but a flow-control refusal (`rate_limited`, `unavailable`) is
    sent at once, ahead of an earlier command's `accepted` (docs/protocol.md), and is the
    latest command's. Here the answers to a line change are held back until the
    cancel-all after it has been refused."""
    held: list[str | bytes] = []
    holding = False

    def route(ws: WebSocketRoute) -> None:
        server_ws = ws.connect_to_server()

        def outgoing(message: str | bytes) -> None:
            nonlocal holding
            msg = json.loads(message)
            if msg["type"] == "set_credit_line" and msg["amount"] == 200_000_000:
                holding = True
                server_ws.send(message)
            elif msg["type"] == "cancel_all" and holding:
                holding = False                 # refused at once, not sent on
                ws.send(json.dumps({"type": "rejected", "client_id": None,
                                    "code": "rate_limited", "message": "over the rate"}))
                for m in held:
                    ws.send(m)
            else:
                server_ws.send(message)

        def incoming(message: str | bytes) -> None:
            if holding:
                held.append(message)
            else:
                ws.send(message)
        ws.on_message(outgoing)
        server_ws.on_message(incoming)

    page = new_page("funder-refusal-order")
    page.route_web_socket(re.compile(r".*/ws$"), route)
    sign_in(page, server, F13)
    page.select_option("#line-core", "DFM")
    page.fill("#line-amount", "1000000")
    page.click("#line-form button[type=submit]")
    expect(page.locator("#line-msg")).to_have_text("Line against DFM set to 1,000,000.00 CNY.")
    page.fill("#line-amount", "2000000")
    page.click("#line-form button[type=submit]")
    page.evaluate("document.getElementById('cancel-all').disabled = false")
    page.click("#cancel-all")
    expect(page.locator("#orders-msg")).to_contain_text("Rejected (rate_limited)")
    expect(page.locator("#line-msg")).to_have_text("Line against DFM set to 2,000,000.00 CNY.")


def test_a_command_left_unconfirmed_by_a_stopped_journal_says_so(
        new_page: Callable[..., Page], server: ServerProcess,
        clients: Callable[[int], WsClient]) -> None:
    """When the journal stops for good, the commands it had not written are answered
    `unconfirmed`: the page's note says so instead of waiting for ever, a named one
    (a bid) and one without a client id (a line) alike, and nothing is sent again."""
    sent: list[str] = []

    def route(ws: WebSocketRoute) -> None:
        server_ws = ws.connect_to_server()

        def outgoing(message: str | bytes) -> None:
            msg = json.loads(message)
            sent.append(msg["type"])
            if msg["type"] in ("bid", "set_credit_line") and msg.get("amount") != 1_000_000_00:
                ws.send(json.dumps({"type": "unconfirmed", "client_id": msg.get("client_id"),
                                    "message": "the journal stopped"}))
            else:
                server_ws.send(message)
        ws.on_message(outgoing)
        server_ws.on_message(ws.send)

    page = new_page("funder-unconfirmed")
    page.route_web_socket(re.compile(r".*/ws$"), route)
    sign_in(page, server, F13)
    page.select_option("#line-core", "DFM")
    page.fill("#line-amount", "1000000")
    page.click("#line-form button[type=submit]")
    expect(page.locator("#line-msg")).to_have_text("Line against DFM set to 1,000,000.00 CNY.")
    page.fill("#line-amount", "2000000")
    page.click("#line-form button[type=submit]")
    unconfirmed = "Not confirmed: the service stopped before this was recorded."
    expect(page.locator("#line-msg")).to_contain_text(unconfirmed)
    page.select_option("#bid-segment", SEG)
    page.fill("#bid-rate", "2.50")
    page.fill("#bid-amount", "1000")
    page.click("#bid-button")
    expect(page.locator("#bid-msg")).to_contain_text(unconfirmed)
    page.wait_for_timeout(500)
    assert sent.count("bid") == 1 and sent.count("set_credit_line") == 2, sent
