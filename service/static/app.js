// The quote board: a live view of every segment's funder rates, an SME panel to quote and
// finance, and a funder panel to manage bids and credit lines. One WebSocket per page,
// speaking the JSON protocol of matcher/protocol.py. Money stays in integer fen and rates
// in integer basis points everywhere; text is made only when something is shown.

// ---- Money and rates --------------------------------------------------------------

const MAX_AMOUNT_FEN = 10n ** 12n;   // one order (matcher/types.py MAX_AMOUNT)
const MAX_LINE_FEN = 10n ** 15n;     // one credit line (MAX_LINE)
const QUOTE_DEBOUNCE_MS = 200;
const LADDER_LEVELS = 5;
const FILLS_SHOWN = 5;

// Parses "1,500,000.25" into 150000025n (places = 2) by string surgery: a float would
// turn 0.29 CNY into 28.999999 fen.
function parseDecimal(text, places) {
  const s = String(text).trim().replace(/[,\s]/g, '');
  if (s === '') return { error: 'enter a value.' };
  if (/^[-−]/.test(s)) return { error: 'must be greater than zero.' };
  const m = /^\+?(\d*)(?:\.(\d*))?$/.exec(s);
  if (!m || (m[1] === '' && !m[2])) return { error: 'not a number.' };
  const frac = m[2] ?? '';
  if (frac.length > places) return { error: `at most ${places} decimals.` };
  const scale = 10n ** BigInt(places);
  return { value: BigInt(m[1] || '0') * scale + BigInt(frac.padEnd(places, '0') || '0') };
}

// An amount in CNY to fen: a Number, exact because every bound is below 2**53.
function parseAmount(text, { max = MAX_AMOUNT_FEN, allowZero = false } = {}) {
  const r = parseDecimal(text, 2);
  if (r.error) return r;
  if (r.value === 0n && !allowZero) return { error: 'must be greater than zero.' };
  if (r.value > max) return { error: `at most ${formatCny(max)}.` };
  return { value: Number(r.value) };
}

// A rate in percent ("2.50") to basis points (250): percent with 2 decimals is bps.
function parseRate(text, capBps) {
  const r = parseDecimal(text, 2);
  if (r.error) return r;
  if (r.value === 0n) return { error: 'must be greater than zero.' };
  if (r.value > BigInt(capBps)) return { error: `at most ${formatRate(capBps)} in this segment.` };
  return { value: Number(r.value) };
}

function formatCny(fen, unit = true) {
  let n = BigInt(fen);
  const sign = n < 0n ? '-' : '';
  if (n < 0n) n = -n;
  const yuan = (n / 100n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  return `${sign}${yuan}.${(n % 100n).toString().padStart(2, '0')}${unit ? ' CNY' : ''}`;
}

// Integer bps, or the float average of a quote, rounded at the edge to 0.01%.
function formatRate(bps) {
  const n = Math.round(bps);
  return `${Math.trunc(n / 100)}.${String(n % 100).padStart(2, '0')}%`;
}

// Simple interest for the tenor, act/365, in fen rounded half up: exact BigInt arithmetic.
function interestFen(amountFen, rateBps, tenorDays) {
  const num = BigInt(amountFen) * BigInt(rateBps) * BigInt(tenorDays);
  const den = 10000n * 365n;
  return (2n * num + den) / (2n * den);
}

const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

// ---- DOM helpers ------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

// Builds elements from data; text goes in as text nodes, so no server string is HTML.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'style') node.style.cssText = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  node.append(...children.flat().filter((c) => c != null && c !== false));
  return node;
}

// replaceChildren() would print a null child as "null": drop the absent ones first.
function setChildren(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c != null && c !== false));
}

function showMsg(node, text, kind = 'error') {
  node.textContent = text;
  node.dataset.kind = text ? kind : '';
}

function notify(text) {
  $('notice-text').textContent = text;
  $('notice').hidden = false;
}

const segmentLabel = (seg) => `${seg.core} · ${plural(seg.tenor_days, 'day')}`;
const rejectText = (r) => `Rejected (${r.code}): ${r.message}`;

// Client ids must be unique per participant for a day; time plus randomness suffices.
function newClientId(prefix) {
  const rand = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
  return `${prefix}-${Date.now().toString(36)}-${rand}`;
}

// Shows the typed amount back in CNY with separators: live below the field, in place on blur.
function bindAmountField(input, hint, parse = parseAmount) {
  input.addEventListener('input', () => {
    const r = parse(input.value);
    if (hint) hint.textContent = r.error || input.value.trim() === '' ? '' : `= ${formatCny(r.value)}`;
  });
  input.addEventListener('blur', () => {
    const r = parse(input.value);
    if (!r.error) input.value = formatCny(r.value, false);
  });
}

// ---- State ------------------------------------------------------------------------

const state = {
  me: null,                  // the welcome event: participant, name, role
  segments: new Map(),       // id -> {id, core, tenor_days, rate_cap_bps}
  books: new Map(),          // id -> latest book event
  status: { orders: [], lines: [] },
  pending: new Map(),        // client_id -> [{kind, msg, text}] awaiting accepted/rejected
  unnamed: [],               // sent without a client id (lines, cancel_all), oldest first
  lineSet: null,             // the line this page set last, to tell its `line` event apart
  suspended: false,          // an admin has suspended this participant's trading
  bulkCancel: false,         // the done messages of a cancel_all are coming
  lastSent: null,            // the latest command, to pin a gateway `error` on
  loans: [],                 // the latest loans shown, newest first (trade ids are unique)
  awayFrom: null,            // client id -> bid listed when the connection dropped
};

const conn = { ws: null, key: null, welcomed: false, everWelcomed: false, retry: 0, timer: 0 };

// ---- Connection -------------------------------------------------------------------

function connect() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}/ws`);
  conn.ws = ws;
  conn.welcomed = false;
  setLive(conn.everWelcomed ? 'reconnecting' : 'connecting');
  // Browsers cannot set an Authorization header: the key goes in the first message.
  ws.addEventListener('open', () => ws.send(JSON.stringify({ type: 'auth', key: conn.key })));
  ws.addEventListener('message', (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    handlers[msg.type]?.(msg);
  });
  ws.addEventListener('close', (ev) => onClose(ws, ev));
}

function onClose(ws, ev) {
  if (ws !== conn.ws || conn.key === null) return;   // signed out, or an old socket
  conn.ws = null;
  forgetUnanswered();
  if (!conn.everWelcomed) {   // nothing is on screen yet: back to the sign-in box
    conn.key = null;
    $('signin-button').disabled = false;
    const why = ev.code === 4401 ? 'This key was not accepted.' : 'Cannot reach the market.';
    showMsg($('signin-msg'), `${why} (close code ${ev.code})`);
    return;
  }
  if (ev.code === 4401) {      // the key was revoked while signed in: retrying cannot help
    setLive('offline');
    notify('Your key is no longer accepted: sign out and sign in with a valid key.');
    return;
  }
  // Anything else (restart, network) is temporary: back off and sign in again.
  setLive('reconnecting');
  const delay = Math.min(15000, 500 * 2 ** conn.retry++);
  conn.timer = setTimeout(connect, delay);
}

const connected = () => Boolean(conn.ws && conn.ws.readyState === WebSocket.OPEN && conn.welcomed);

// What the person asked for says so when it cannot go; a read the page makes by itself
// (`quiet`: a status refresh, a quote while typing) is simply made again on the next
// welcome.
function send(msg, { quiet = false } = {}) {
  if (!connected()) {
    if (!quiet) notify('Not connected to the market: try again in a moment.');
    return false;
  }
  conn.ws.send(JSON.stringify(msg));
  return true;
}

// Sends a command and remembers where its accepted/rejected answer should be shown.
function sendCommand(msg, pending) {
  if (!send(msg)) return false;
  const list = state.pending.get(msg.client_id) ?? [];
  list.push(pending);
  state.pending.set(msg.client_id, list);
  state.lastSent = { clientId: msg.client_id, pending };
  return true;
}

// Answers never cross connections: what the old one still waited for will not be answered
// on the next, and an answer there must not be pinned on it. Each waiting note says so;
// the next welcome brings the truth (status, latest loans) and sends the SME's ask again.
function forgetUnanswered() {
  for (const list of state.pending.values()) {
    for (const p of list) if (p.kind !== 'ask') showMsg(p.msg, 'Connection lost before the answer: see the list once reconnected.', 'info');
  }
  for (const p of state.unnamed) showMsg($(p.kind === 'line' ? 'line-msg' : 'orders-msg'), 'Connection lost before the answer: see the list once reconnected.', 'info');
  state.pending.clear();
  state.unnamed = [];
  state.lastSent = null;
  if (sme.ask?.checking) sme.ask.checking = false;   // its read back is lost too: again
  sme.financeAfterQuote = false;   // never an ask the person did not see go out
  noteBidsAtRisk();
}

function takePending(clientId) {
  const list = state.pending.get(clientId);
  const item = list?.shift();
  if (list && !list.length) state.pending.delete(clientId);
  return item;
}

function setLive(mode) {
  const live = $('live');
  live.dataset.state = mode;
  live.textContent = { live: 'Live', connecting: 'Connecting…', reconnecting: 'Reconnecting…',
    offline: 'Offline' }[mode];
}

function signIn(key) {
  conn.key = key;
  conn.everWelcomed = false;
  conn.retry = 0;
  $('signin-button').disabled = true;
  showMsg($('signin-msg'), 'Signing in…', 'info');
  connect();
}

// Keys live only in this page's memory, so a reload is a complete and certain sign-out.
function signOut() {
  conn.key = null;
  conn.ws?.close(1000, 'signed out');
  location.reload();
}

// The segment list with core and tenor comes over HTTP; the welcome only names ids.
async function fetchSegments() {
  try {
    const res = await fetch('/v1/segments', { cache: 'no-store' });
    if (res.ok) return await res.json();
  } catch { /* offline: keep what is shown */ }
  return null;
}

function setSegments(list) {
  list.sort((a, b) => a.core.localeCompare(b.core) || a.tenor_days - b.tenor_days);
  state.segments = new Map(list.map((s) => [s.id, s]));
}

async function loadSegments(ids) {
  const byId = new Map((await fetchSegments() ?? []).map((s) => [s.id, s]));
  setSegments(ids.map((id) => byId.get(id) ?? { id, core: id, tenor_days: 0, rate_cap_bps: 10000, placeholder: true }));
}

// Segments an admin opens while the page is up appear on it, subscribed, without a reload.
const SEGMENT_REFRESH_MS = 10_000;

// Also replaces the stand-ins (core = id, no tenor) of a first read that failed.
async function refreshSegments() {
  if (!conn.welcomed) return;
  const fresh = (await fetchSegments() ?? []).filter((s) => !state.segments.has(s.id)
    || state.segments.get(s.id).placeholder);
  if (!fresh.length) return;
  const added = fresh.filter((s) => !state.segments.has(s.id));
  const chosen = ['sme-segment', 'bid-segment', 'line-core'].map((id) => [id, $(id).value]);
  setSegments([...[...state.segments.values()].filter((s) => !fresh.some((f) => f.id === s.id)), ...fresh]);
  showWorkspace();
  for (const [id, value] of chosen) if ([...$(id).options].some((o) => o.value === value)) $(id).value = value;
  if (added.length) send({ type: 'subscribe', segments: added.map((s) => s.id) });
}

// ---- Events -----------------------------------------------------------------------

async function onWelcome(msg) {
  conn.welcomed = true;
  conn.retry = 0;
  const first = !conn.everWelcomed;
  conn.everWelcomed = true;
  state.me = msg;
  // Another gateway (a restart on an emptied Redis, a failover) may number from lower:
  // a newer picture is newer within one connection only.
  state.books.clear();
  if (msg.role === 'funder' || msg.role === 'sme') requestLoans();
  if (first) {
    await loadSegments(msg.segments);
    showWorkspace();
    setInterval(refreshSegments, SEGMENT_REFRESH_MS);
    // The list could not be read: stand-ins are shown; read it again soon.
    if ([...state.segments.values()].some((s) => s.placeholder)) setTimeout(refreshSegments, 2000);
  }
  setLive('live');
  send({ type: 'subscribe', segments: [...state.segments.keys()] });
  if (msg.role === 'funder') requestStatus();
  if (msg.role === 'sme') {
    sendQuotes();
    resumeAsk();
    send({ type: 'status' });   // only to learn whether an admin suspended this SME
  }
}

// The latest loans, at every sign-in and reconnect: a loan made while the page was away
// shows up, and the list never has more than these few, so no catch-up is needed.
const RECENT_LOANS = 5;

function requestLoans() {
  send({ type: 'fills', limit: RECENT_LOANS, ref: 'loans' });
}

function onFills(page) {
  if (page.ref === 'ask-check') return settleLostAsk(page);
  page.fills.forEach(showLoan);
}

// Trade ids are "<seq>-<n>": in the order the loans were made.
function newerTrade(a, b) {
  const [x, y] = [a.split('-').map(BigInt), b.split('-').map(BigInt)];
  return x[0] > y[0] || (x[0] === y[0] && x[1] > y[1]);
}

// Each loan once, newest first, whichever came first: the page or the live fill.
function showLoan(fill) {
  const loans = state.loans;
  if (loans.some((l) => l.trade_id === fill.trade_id)) return;
  const at = loans.findIndex((l) => newerTrade(fill.trade_id, l.trade_id));
  loans.splice(at < 0 ? loans.length : at, 0, fill);
  loans.length = Math.min(loans.length, RECENT_LOANS);
  setChildren($('loan-list'), loans.map((f) => el('li', { class: 'loan', dataset: { trade: f.trade_id } },
    el('span', { class: 'amount', dataset: { fen: f.amount } }, formatCny(f.amount)),
    el('span', { class: 'rate', dataset: { bps: f.rate_bps } }, formatRate(f.rate_bps)),
    el('span', { class: 'who' }, `${f.side === 'bid' ? `to SME ${f.sme}` : f.funder_name} · ${f.segment}`))));
  $('loans').hidden = false;
}

function onAccepted(msg) {
  if (msg.client_id === null) return unnamedAnswer(null);
  const p = takePending(msg.client_id);
  if (p?.text) showMsg(p.msg, p.text, 'ok');
  if (state.me?.role === 'funder') requestStatus();
}

function onRejected(msg) {
  if (msg.client_id === null && state.unnamed.length) return unnamedAnswer(msg, FLOW_CONTROL.has(msg.code));
  const p = takePending(msg.client_id);
  if (p?.kind === 'ask') smeAskEvent(msg.client_id, (a) => { a.rejected = msg; });
  if (p) showMsg(p.msg, rejectText(msg));
  else notify(rejectText(msg));
  if (state.me?.role === 'funder') requestStatus();
}

// An error names the command's client id when the command had a readable one; else the
// gateway answers a message it cannot take at once, so an error right after a command
// most likely is that command's. Either way its "in progress" note ends.
// Only a message that could not be read (`malformed`, `invalid`) is refused with an
// `error` that may be a command's; everything else an `error` answers is a read (a quote,
// a page of loans, a subscription, a status), and never settles a command.
const COMMAND_ERRORS = new Set(['malformed', 'invalid']);

function onError(msg) {
  if (msg.ref === 'loans' || msg.ref === 'ask-check') {   // Redis was busy: read again
    setTimeout(() => {
      if (!conn.welcomed) return;
      if (msg.ref === 'loans') requestLoans();
      else if (sme.ask?.checking) askCheckPage(sme.ask);
    }, 2000);
    return;
  }
  const text = `Error (${msg.code}): ${msg.message}`;
  if (msg.ref != null || (msg.client_id == null && !COMMAND_ERRORS.has(msg.code))) {
    if (state.me?.role === 'sme' && msg.ref != null) showMsg($('sme-msg'), `Quote: ${text}`);
    else notify(text);
    return;
  }
  notify(text);
  const last = state.lastSent;
  state.lastSent = null;
  const clientId = msg.client_id ?? last?.clientId;
  const pending = msg.client_id != null ? takePending(clientId) : dropPending(last);
  if (!pending) return;
  showMsg(pending.msg, text);
  if (pending.kind === 'ask') smeAskEvent(clientId, (a) => { a.rejected = msg; });
}

// The waiting note of one particular send, if it still waits.
function dropPending(sent) {
  const list = sent && state.pending.get(sent.clientId);
  if (!list?.includes(sent.pending)) return null;
  list.splice(list.indexOf(sent.pending), 1);
  if (!list.length) state.pending.delete(sent.clientId);
  return sent.pending;
}

function onFill(fill) {
  showLoan(fill);
  if (fill.side === 'ask') return smeAskEvent(fill.client_id, (a) => addAskFill(a, fill));
  requestStatus();
}

// A line changed: the platform reported repayments on this funder's loans (part of its
// line is free again; its fills, if the bids lent it at once, came just before), or a
// line was set, by this page (its form already says so) or by another of its sessions.
function onLine(msg) {
  const mine = state.lineSet;
  if (msg.reason === 'repaid') {
    addActivity(`Repaid against ${msg.core}: ${formatCny(msg.repaid)} in all; `
      + `${formatCny(Math.max(0, msg.line - msg.used))} of the line free to lend`);
  } else if (mine && mine.core === msg.core && mine.amount === msg.line) {
    state.lineSet = null;
  } else {
    addActivity(`Line against ${msg.core} set to ${formatCny(msg.line)} in another session`);
  }
  requestStatus();
}

// An admin suspended or reinstated this participant: said at once, and its orders are
// not sent while suspended (the `done`s of the orders that ended came just before).
function onSuspension(msg) {
  state.suspended = msg.suspended;
  const node = $(state.me?.role === 'sme' ? 'sme-msg' : 'bid-msg');
  if (msg.suspended) showMsg(node, SUSPENDED);
  else showMsg(node, 'An admin has reinstated your trading: you may place orders again.', 'ok');
  if (state.me?.role === 'funder') requestStatus();
}

function onDone(done) {
  if (state.me?.role === 'sme') return smeAskEvent(done.client_id, (a) => { a.done = done; });
  if (done.reason === 'cancelled' && state.bulkCancel) {
    addActivity(`Bid cancelled: ${formatCny(done.remaining)} withdrawn`);
  } else if (done.reason === 'cancelled') {
    showMsg($('orders-msg'), `Bid cancelled: ${formatCny(done.remaining)} withdrawn.`, 'ok');
  } else if (done.reason === 'expired') {
    addActivity(`Day bid expired: ${formatCny(done.remaining)} withdrawn`);
  } else if (done.reason === 'halted') {
    addActivity(`Bid ended, trading in its segment was halted: ${formatCny(done.remaining)} withdrawn`);
  } else if (done.reason === 'suspended') {
    addActivity(`Bid ended, an admin suspended your trading: ${formatCny(done.remaining)} withdrawn`);
  }
  requestStatus();
}

// ---- The board --------------------------------------------------------------------

function showWorkspace() {
  $('signin').hidden = true;
  $('workspace').hidden = false;
  $('session').hidden = false;
  const me = state.me;
  $('who').textContent = `${me.name} · ${me.role === 'sme' ? 'SME' : me.role}`;
  $('sme-panel').hidden = me.role !== 'sme';
  $('funder-panel').hidden = me.role !== 'funder';
  $('workspace').dataset.role = me.role;
  if (me.role === 'funder') $('funder-panel').append($('loans'));   // the SME panel's by default
  const cards = [...state.segments.values()].map((seg) => el('article', {
    class: 'card', id: `card-${seg.id}`, dataset: { segment: seg.id },
  }));
  setChildren($('cards'), ...cards);
  for (const seg of state.segments.values()) renderCard(seg.id);
  fillSegmentSelects();
}

function onBook(book) {
  const prev = state.books.get(book.segment);
  if (prev && prev.seq > book.seq) return;   // an older picture: keep the newer one
  state.books.set(book.segment, book);
  renderCard(book.segment, prev);
  const halted = `Trading in ${book.segment} is halted: no loans until it reopens.`;
  if (prev?.halted && !book.halted && $('sme-msg').textContent === halted) showMsg($('sme-msg'), '');
  if (state.me?.role === 'sme' && book.segment === $('sme-segment').value && !sme.timer) {
    // The book moved: keep the quote on screen true. Not by restarting a quote already
    // due: with an update every 50 ms it would never be sent.
    scheduleQuote();
  }
}

function renderCard(id, prev) {
  const card = $(`card-${id}`);
  const seg = state.segments.get(id);
  if (!card || !seg) return;
  const book = state.books.get(id);
  const best = book?.best_rate_bps ?? null;
  const trend = prev && best !== null && prev.best_rate_bps !== null && best !== prev.best_rate_bps
    ? (best < prev.best_rate_bps ? 'down' : 'up') : '';
  card.toggleAttribute('data-halted', Boolean(book?.halted));   // an admin stopped it
  setChildren(card,
    el('header', { class: 'card-head' },
      el('div', {},
        el('h3', {}, seg.core, ' ', el('span', { class: 'tenor' }, plural(seg.tenor_days, 'day'))),
        el('p', { class: 'seg-id' }, seg.id)),
      el('div', { class: 'best' },
        el('span', { class: 'label' }, 'Best rate'),
        el('strong', { class: 'best-rate', dataset: { bps: best ?? '', trend } },
          best === null ? '—' : formatRate(best)))),
    renderLadder(book),
    el('dl', { class: 'facts' },
      el('div', {}, el('dt', {}, 'Resting demand'),
        el('dd', { class: 'demand', dataset: { fen: book?.demand_amount ?? 0 } },
          formatCny(book?.demand_amount ?? 0),
          book?.demand_orders ? el('small', {}, ` · ${plural(book.demand_orders, 'ask')}`) : null)),
      el('div', {}, el('dt', {}, 'Rate cap'), el('dd', {}, formatRate(seg.rate_cap_bps)))),
    renderFills(book));
  if (prev) flash(card);
}

// Funder levels as bars scaled to the largest shown level, best (lowest) rate first.
function renderLadder(book) {
  if (book?.halted) return el('p', { class: 'ladder empty halted' }, 'Trading halted');
  const levels = (book?.levels ?? []).slice(0, LADDER_LEVELS);
  if (!levels.length) return el('p', { class: 'ladder empty' }, 'No funder bids yet');
  const max = Math.max(...levels.map(([, amount]) => amount));
  return el('ol', { class: 'ladder', 'aria-label': 'Funder rates' }, levels.map(([rate, amount, orders]) =>
    el('li', { class: 'level', dataset: { bps: rate, fen: amount, orders } },
      el('span', { class: 'bar', style: `width:${Math.max(2, (amount / max) * 100).toFixed(1)}%` }),
      el('span', { class: 'rate' }, formatRate(rate)),
      el('span', { class: 'amount' }, formatCny(amount)),
      el('span', { class: 'orders' }, plural(orders, 'order')))));
}

function renderFills(book) {
  const fills = (book?.last_fills ?? []).slice(0, FILLS_SHOWN);
  return el('div', { class: 'fills' },
    el('h4', {}, 'Last fills'),
    fills.length
      ? el('ul', {}, fills.map(([rate, amount]) => el('li', { dataset: { bps: rate, fen: amount } },
        el('span', { class: 'rate' }, formatRate(rate)), ' ', formatCny(amount))))
      : el('p', { class: 'muted' }, 'None today'));
}

function flash(node) {
  node.classList.remove('flash');
  void node.offsetWidth;   // restart the animation
  node.classList.add('flash');
}

function fillSegmentSelects() {
  const options = () => [...state.segments.values()].map((s) => el('option', { value: s.id }, segmentLabel(s)));
  setChildren($('sme-segment'), ...options());
  setChildren($('bid-segment'), ...options());
  const cores = [...new Set([...state.segments.values()].map((s) => s.core))];
  setChildren($('line-core'), ...cores.map((c) => el('option', { value: c }, c)));
}

// ---- SME: quote and finance -------------------------------------------------------

const sme = {
  reqSeq: 0,
  want: null,          // {segment, amount, ref}: what the latest quotes were asked for
  quotes: {},          // mode ('split' | 'single') -> quote event for `want`
  timer: 0,
  financeAfterQuote: false,
  ask: null,           // the financing in flight or last done
};

const smeMode = () => document.querySelector('input[name="mode"]:checked').value;

// Reads the form; bad input clears the quote and shows why, and nothing is sent.
function smeRead({ submit = false } = {}) {
  const text = $('sme-amount').value;
  const msg = $('sme-msg');
  if (text.trim() === '' && !submit) {
    showMsg(msg, '');
    return null;
  }
  const r = parseAmount(text);
  if (r.error) {
    showMsg(msg, `Amount: ${r.error}`);
    return null;
  }
  showMsg(msg, '');
  return { segment: $('sme-segment').value, amount: r.value };
}

function onSmeInput() {
  sme.financeAfterQuote = false;   // "Finance now" was for what was typed before
  const want = smeRead();
  clearTimeout(sme.timer);
  if (!want || !sme.want || want.segment !== sme.want.segment || want.amount !== sme.want.amount) {
    sme.quotes = {};
    sme.want = want;
  }
  renderQuotes();
  if (want) scheduleQuote();
}

function scheduleQuote() {
  clearTimeout(sme.timer);
  if (sme.want) sme.timer = setTimeout(sendQuotes, QUOTE_DEBOUNCE_MS);
}

// Both alternatives at once: split across funders, and the best single funder.
function sendQuotes() {
  clearTimeout(sme.timer);
  sme.timer = 0;
  if (!sme.want) return;
  const ref = `q${++sme.reqSeq}`;
  sme.want.ref = ref;
  const { segment, amount } = sme.want;
  send({ type: 'quote', segment, amount, single_funder: false, ref: `${ref}-split` }, { quiet: true });
  send({ type: 'quote', segment, amount, single_funder: true, ref: `${ref}-single` }, { quiet: true });
}

function onQuote(q) {
  const [ref, mode] = (q.ref ?? '').split('-');
  if (!sme.want || ref !== sme.want.ref) return;   // an answer to an older question
  sme.quotes[mode] = q;
  renderQuotes();
  if (sme.financeAfterQuote && sme.quotes.split && sme.quotes.single) {
    sme.financeAfterQuote = false;
    finance();
  }
}

// An admin halted the segment: nothing can be financed there until it reopens.
function haltedNote(segment) {
  return state.books.get(segment)?.halted ? `Trading in ${segment} is halted: no loans until it reopens.` : null;
}

function renderQuotes() {
  const halted = haltedNote($('sme-segment').value);
  renderQuote($('quote-split'), sme.quotes.split, halted ?? 'No funder can lend in this segment right now.');
  renderQuote($('quote-single'), sme.quotes.single, halted ?? 'No single funder can lend this amount.');
}

function renderQuote(node, q, none) {
  node.dataset.fillable = q ? q.fillable : '';
  if (!q) {
    setChildren(node, el('span', { class: 'muted' }, sme.want ? 'Quoting…' : 'Enter an amount'));
    return;
  }
  if (q.fillable === 0) {
    setChildren(node, el('span', { class: 'muted' }, none));
    return;
  }
  // Spans, not a <dl>: the quote sits inside the <label> that selects it.
  const item = (label, key, value, text) => el('span', { class: 'kv' },
    el('span', { class: 'k' }, label), el('span', { class: 'v', dataset: { [key]: value } }, text));
  setChildren(node, el('span', { class: 'kvs' },
    item('Fillable', 'fen', q.fillable, q.fillable < q.amount
      ? [formatCny(q.fillable), el('small', {}, ` of ${formatCny(q.amount)}`)] : formatCny(q.fillable)),
    item('Avg rate', 'bps', q.avg_rate_bps, formatRate(q.avg_rate_bps)),
    item('Worst rate', 'bps', q.worst_rate_bps, formatRate(q.worst_rate_bps)),
    item('Funders', 'count', q.funders, String(q.funders))));
}

function onFinanceSubmit(ev) {
  ev.preventDefault();
  if (sme.ask && !askEnded(sme.ask)) return;
  const want = smeRead({ submit: true });
  if (!want) return;
  const fresh = sme.want && sme.want.segment === want.segment && sme.want.amount === want.amount;
  if (fresh && sme.quotes.split && sme.quotes.single) return finance();
  if (!connected()) return showMsg($('sme-msg'), 'Not connected to the market: try again once it is back.');
  // No answer yet for what is typed: ask now, and finance as soon as it is in.
  sme.want = want;
  sme.quotes = {};
  sme.financeAfterQuote = true;
  renderQuotes();
  sendQuotes();
}

// An IOC ask capped at the quote's worst rate: if the market moved against the SME in the
// meantime, it gets less money rather than a rate it has not seen.
function finance() {
  const mode = smeMode();
  const q = sme.quotes[mode];
  // Halted: say so, even with a quote from before the halt still on screen.
  const halted = state.suspended ? SUSPENDED : haltedNote($('sme-segment').value);
  if (halted || !q || q.fillable === 0) {
    showMsg($('sme-msg'), halted
      ?? (mode === 'single' ? 'No single funder can lend this amount right now.'
        : 'No funder can lend in this segment right now.'));
    return;
  }
  const seg = state.segments.get(q.segment);
  const clientId = newClientId('ask');
  const msg = { type: 'ask', client_id: clientId, segment: q.segment, amount: q.amount,
    max_rate_bps: q.worst_rate_bps, tif: 'ioc', single_funder: mode === 'single' };
  const ask = { clientId, seg, amount: q.amount, cap: q.worst_rate_bps, fills: [], done: null, rejected: null,
    lost: false, checking: false, after: askCursor() };
  if (!sendCommand(msg, { kind: 'ask', msg: $('sme-msg') })) return;   // nothing went out
  sme.ask = ask;
  $('finance').disabled = true;
  renderResult();
}

// Folds an event about the SME's own ask (fill, done, rejected) into the result shown.
function smeAskEvent(clientId, apply) {
  if (sme.ask?.clientId !== clientId) return;   // e.g. an ask from another tab
  apply(sme.ask);
  $('finance').disabled = !askEnded(sme.ask);
  renderResult();
}

const askEnded = (a) => Boolean(a.done || a.rejected || a.lost);

// A loan comes live and in the latest-loans page after a reconnect: count it once.
function addAskFill(ask, fill) {
  if (!ask.fills.some((f) => f.trade_id === fill.trade_id)) ask.fills.push(fill);
}

// Pages of loans read back for an ask whose answers were lost.
const ASK_CHECK_LOANS = 100;

// Where the SME's loans made by an ask sent now can start: after every command the page
// has seen journaled (its newest book's, or its newest loan's). The ask is sequenced
// after those; if a gateway after a reconnect numbers from lower, the journal lost the
// ask too (it loses only its newest commands), and there is nothing to find.
function askCursor() {
  let seq = 0;
  for (const b of state.books.values()) seq = Math.max(seq, b.seq);
  const loan = state.loans[0]?.trade_id;
  return loan && newerTrade(loan, `${seq}-0`) ? loan : `${seq}-0`;
}

// The connection dropped while the ask was out, and its answers with it. It is not sent
// again: a retry is recognised only for two minutes after the ask ended, after
// which the same client id would be a second ask and a second loan. An IOC ask is over
// once the gateway has taken it, so its loans, read back from the journal by client id,
// are the whole outcome; none means it was not filled or never arrived. They are read
// from `askCursor()` on, page by page, for as many loans as came after. Until they are
// read, "Finance now" stays locked.
function resumeAsk() {
  const a = sme.ask;
  if (!a || askEnded(a) || a.checking) return;
  a.checking = true;
  askCheckPage(a);
}

function askCheckPage(a) {
  send({ type: 'fills', after: a.after, limit: ASK_CHECK_LOANS, ref: 'ask-check' });
}

function settleLostAsk(page) {
  const a = sme.ask;
  if (!a?.checking) return;
  for (const f of page.fills) if (f.client_id === a.clientId) addAskFill(a, f);
  if (page.next != null) a.after = page.next;
  // One command makes all of an ask's loans, one after another: past them, or past
  // the end, nothing more can be its.
  const seq = a.fills[0]?.seq;
  if (page.more && !(seq !== undefined && page.fills.some((f) => f.seq > seq))) {
    askCheckPage(a);
    return;
  }
  a.checking = false;
  smeAskEvent(a.clientId, (x) => { x.lost = true; });
}

const OUTCOMES = { filled: 'Filled', partial: 'Partly filled', unfilled: 'Unfilled' };

function renderResult() {
  const a = sme.ask;
  const box = $('sme-result');
  box.hidden = !a;
  if (!a) return;
  let outcome = 'pending';
  if (a.rejected) outcome = 'rejected';
  else if (a.done) outcome = a.done.reason === 'filled' ? 'filled' : a.done.filled > 0 ? 'partial' : 'unfilled';
  else if (a.lost) {                  // read back from the journal after a reconnect
    const lent = a.fills.reduce((s, f) => s + f.amount, 0);
    outcome = lent === a.amount ? 'filled' : lent > 0 ? 'partial' : 'unfilled';
  }
  const label = { ...OUTCOMES, pending: 'Processing…', rejected: 'Rejected' }[outcome];
  const total = a.fills.reduce((s, f) => s + BigInt(f.amount), 0n);
  const interest = a.fills.reduce((s, f) => s + interestFen(f.amount, f.rate_bps, a.seg.tenor_days), 0n);
  const rows = a.fills.map((f) => el('tr', { class: 'loan' },
    el('td', { class: 'funder' }, f.funder_name),
    el('td', { class: 'rate', dataset: { bps: f.rate_bps } }, formatRate(f.rate_bps)),
    el('td', { class: 'amount', dataset: { fen: f.amount } }, formatCny(f.amount),
      el('small', {}, `interest ${formatCny(interestFen(f.amount, f.rate_bps, a.seg.tenor_days))}`))));
  setChildren(box,
    el('header', {},
      el('h3', {}, 'Your financing'),
      el('span', { class: 'badge', id: 'outcome', dataset: { outcome } }, label)),
    el('p', { class: 'muted' }, `${segmentLabel(a.seg)} · requested ${formatCny(a.amount)} · `
      + `no rate above ${formatRate(a.cap)}`),
    rows.length ? el('table', { class: 'loans' },
      el('thead', {}, el('tr', {}, el('th', {}, 'Funder'), el('th', {}, 'Rate'), el('th', {}, 'Amount'))),
      el('tbody', {}, rows)) : null,
    el('dl', { class: 'totals' },
      el('div', {}, el('dt', {}, 'Financed'), el('dd', { id: 'total-financed', dataset: { fen: total } }, formatCny(total))),
      el('div', {}, el('dt', {}, `Interest for ${plural(a.seg.tenor_days, 'day')}`),
        el('dd', { id: 'total-interest', dataset: { fen: interest } }, formatCny(interest)))));
}

// ---- Funder: lines, bids, amend, cancel -------------------------------------------

let statusTimer = 0;

// Coalesces the refreshes a burst of fills would cause into one status request.
function requestStatus() {
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => send({ type: 'status' }, { quiet: true }), 60);
}

const SUSPENDED = 'An admin has suspended your trading: contact the platform.';

// The connection dropped: the bids listed may be gone by the time it is back (cancel on
// disconnect, when this was the funder's last connection; or lent meanwhile), and their
// `done`s went to the closed connection. Until the next status the list is shown as it
// was, without its buttons, and that status says which of them ended.
function noteBidsAtRisk() {
  if (state.me?.role !== 'funder' || state.awayFrom) return;
  const bids = state.status.orders.filter((o) => o.side === 'bid');
  state.awayFrom = new Map(bids.map((o) => [o.client_id, o]));
  $('orders').dataset.stale = 'true';
  for (const b of $('orders').querySelectorAll('button')) b.disabled = true;
  $('cancel-all').disabled = true;
  if (bids.length) {
    showMsg($('orders-msg'), state.me.cancel_on_disconnect
      ? 'Connection lost: your bids are cancelled unless another session of yours is open (cancel on disconnect). The list is refreshed once reconnected.'
      : 'Connection lost: your bids stay resting. The list is refreshed once reconnected.', 'info');
  }
}

// The first status after a reconnect: each bid listed when the connection dropped that
// is no longer resting ended meanwhile.
function reportBidsEndedAway(status) {
  const before = state.awayFrom;
  state.awayFrom = null;
  delete $('orders').dataset.stale;
  if (!before?.size) return;
  const resting = new Set(status.orders.map((o) => o.client_id));
  const why = state.me.cancel_on_disconnect
    ? 'cancelled when the connection dropped (cancel on disconnect), or lent meanwhile'
    : 'lent, expired or ended by an admin meanwhile';
  let ended = 0;
  for (const o of before.values()) {
    if (resting.has(o.client_id)) continue;
    ended += 1;
    const seg = state.segments.get(o.segment);
    addActivity(`Bid at ${formatRate(o.rate_bps)} in ${seg ? segmentLabel(seg) : o.segment} `
      + `(${formatCny(o.remaining)} resting) ended while the connection was down: ${why}`);
  }
  showMsg($('orders-msg'), ended ? `${plural(ended, 'bid')} ended while the connection was down: see Activity.` : '', 'info');
}

function onStatus(status) {
  if (state.awayFrom) reportBidsEndedAway(status);
  state.status = status;
  state.suspended = status.suspended;
  if (status.suspended) showMsg($(state.me?.role === 'sme' ? 'sme-msg' : 'bid-msg'), SUSPENDED);
  state.bulkCancel = false;
  renderLines();
  renderOrders();
}

function lineFor(core) {
  const l = state.status.lines.find((x) => x.core === core);
  return l ? { line: l.line, used: l.used, repaid: l.repaid, left: Math.max(0, l.line - l.used) } : null;
}

function renderLines() {
  const cores = [...new Set([...state.segments.values()].map((s) => s.core))];
  setChildren($('lines'), ...cores.map((core) => {
    const l = lineFor(core);
    const pct = l && l.line ? Math.min(100, (l.used / l.line) * 100) : 0;
    return el('li', { dataset: { core, left: l ? l.left : 0 } },
      el('div', { class: 'line-head' }, el('strong', {}, core),
        el('span', {}, l && l.line ? `${formatCny(l.left)} available` : 'No line')),
      el('div', { class: 'meter' }, el('span', { style: `width:${pct.toFixed(1)}%` })),
      l && l.line ? el('small', { class: 'muted' }, `${formatCny(l.used)} used of ${formatCny(l.line)}`,
        l.repaid ? ` · ${formatCny(l.repaid)} repaid so far` : '') : null);
  }));
}

// Keyed by client id, so an amend form someone is typing into survives a refresh.
function renderOrders() {
  const list = $('orders');
  const bids = state.status.orders.filter((o) => o.side === 'bid');
  $('cancel-all').disabled = !bids.length;
  const keep = new Set(bids.map((o) => o.client_id));
  for (const li of [...list.children]) if (!keep.has(li.dataset.clientId)) li.remove();
  for (const b of list.querySelectorAll('button')) b.disabled = false;   // live again
  if (!bids.length) {
    setChildren(list, el('li', { class: 'empty muted' }, 'No resting bids.'));
    return;
  }
  list.querySelector('.empty')?.remove();
  for (const o of bids) {
    let li = list.querySelector(`li[data-client-id="${CSS.escape(o.client_id)}"]`);
    if (!li) li = orderItem(o.client_id);
    const seg = state.segments.get(o.segment);
    setChildren(li.querySelector('.order-main'),
      el('strong', {}, seg ? segmentLabel(seg) : o.segment),
      el('span', { class: 'rate', dataset: { bps: o.rate_bps } }, formatRate(o.rate_bps)));
    setChildren(li.querySelector('.order-sub'),
      el('span', { dataset: { fen: o.remaining } }, `${formatCny(o.remaining)} resting`),
      el('span', {}, o.tif === 'day' ? ' · Day' : o.tif === 'gtc' ? ' · GTC' : ''),
      o.filled ? el('span', {}, ` · ${formatCny(o.filled)} lent`) : null);
    list.append(li);   // keeps the server's order: oldest first
  }
}

// One resting bid with its Amend / Cancel buttons and a folded amend form (index.html).
function orderItem(clientId) {
  const li = $('tpl-order').content.firstElementChild.cloneNode(true);
  li.dataset.clientId = clientId;
  const form = li.querySelector('form.amend');
  bindAmountField(form.elements.amount, null);
  form.addEventListener('submit', (ev) => { ev.preventDefault(); amend(clientId, form); });
  li.querySelector('.amend-toggle').addEventListener('click', () => { form.hidden = !form.hidden; });
  li.querySelector('.amend-close').addEventListener('click', () => { form.hidden = true; });
  li.querySelector('.cancel').addEventListener('click', () => cancel(clientId));
  return li;
}

// Without a line against the core enterprise a bid is refused (`no_credit_line`). A bid
// for more than the line leaves rests whole and lends what the line allows, the rest as
// repayments free it (ADR 13): it is sent, and the answer says so.
function creditError(segment) {
  const core = state.segments.get(segment)?.core;
  const l = lineFor(core);
  return !l || l.line === 0 ? `Set a credit line against ${core} first.` : null;
}

function overLineNote(segment, amount) {
  const core = state.segments.get(segment)?.core;
  const l = lineFor(core);
  return l && amount > l.left
    ? ` Your line against ${core} has ${formatCny(l.left)} free: the bid lends up to that now, the rest as repayments free it.`
    : '';
}

function onBidSubmit(ev) {
  ev.preventDefault();
  const msgNode = $('bid-msg');
  if (state.suspended) return showMsg(msgNode, SUSPENDED);
  const segment = $('bid-segment').value;
  const seg = state.segments.get(segment);
  const rate = parseRate($('bid-rate').value, seg.rate_cap_bps);
  if (rate.error) return showMsg(msgNode, `Rate: ${rate.error}`);
  const amount = parseAmount($('bid-amount').value);
  if (amount.error) return showMsg(msgNode, `Amount: ${amount.error}`);
  const credit = creditError(segment);
  if (credit) return showMsg(msgNode, credit);
  const tif = document.querySelector('input[name="tif"]:checked').value;
  const msg = { type: 'bid', client_id: newClientId('bid'), segment, rate_bps: rate.value,
    amount: amount.value, tif };
  if (sendCommand(msg, { kind: 'bid', msg: msgNode,
    text: `Bid placed: ${formatCny(amount.value)} at ${formatRate(rate.value)} in ${segmentLabel(seg)}.`
      + overLineNote(segment, amount.value) })) {
    showMsg(msgNode, 'Placing bid…', 'info');
  }
}

function amend(clientId, form) {
  const order = state.status.orders.find((o) => o.client_id === clientId);
  const msgNode = form.querySelector('.msg');
  if (!order) return showMsg(msgNode, 'This bid is no longer resting.');
  const msg = { type: 'amend', client_id: clientId };
  const rateText = form.elements.rate.value;
  const amountText = form.elements.amount.value;
  if (rateText.trim() === '' && amountText.trim() === '') return showMsg(msgNode, 'Give a new rate, a new amount, or both.');
  if (rateText.trim() !== '') {
    const r = parseRate(rateText, state.segments.get(order.segment).rate_cap_bps);
    if (r.error) return showMsg(msgNode, `Rate: ${r.error}`);
    msg.rate_bps = r.value;
  }
  if (amountText.trim() !== '') {
    const a = parseAmount(amountText);
    if (a.error) return showMsg(msgNode, `Amount: ${a.error}`);
    msg.amount = a.value;
  }
  const note = msg.amount !== undefined ? overLineNote(order.segment, msg.amount) : '';
  if (sendCommand(msg, { kind: 'amend', msg: msgNode, text: `Bid amended.${note}` })) {
    showMsg(msgNode, 'Saving…', 'info');
    form.elements.rate.value = '';
    form.elements.amount.value = '';
  }
}

function cancel(clientId) {
  if (sendCommand({ type: 'cancel', client_id: clientId }, { kind: 'cancel', msg: $('orders-msg') })) {
    showMsg($('orders-msg'), 'Cancelling…', 'info');
  }
}

function onLineSubmit(ev) {
  ev.preventDefault();
  const msgNode = $('line-msg');
  const core = $('line-core').value;
  const r = parseAmount($('line-amount').value, { max: MAX_LINE_FEN, allowZero: true });
  if (r.error) return showMsg(msgNode, `Line: ${r.error}`);
  if (send({ type: 'set_credit_line', core, amount: r.value })) {
    state.unnamed.push({ kind: 'line', core, amount: r.value });
    showMsg(msgNode, 'Setting line…', 'info');
  }
}

// Refused at once, ahead of earlier commands' answers (docs/protocol.md, "Ordering and
// delivery"): such a refusal is the latest command's, not the oldest one's.
const FLOW_CONTROL = new Set(['rate_limited', 'unavailable']);

// set_credit_line and cancel_all carry no client id: their other answers come back in the
// order sent, so each is the oldest such command's.
function unnamedAnswer(rejected, newest = false) {
  const p = newest ? state.unnamed.pop() : state.unnamed.shift();
  requestStatus();
  if (!p) return;
  const msgNode = $(p.kind === 'line' ? 'line-msg' : 'orders-msg');
  if (rejected) showMsg(msgNode, rejectText(rejected));
  else if (p.kind === 'line') {
    state.lineSet = { core: p.core, amount: p.amount };   // its `line` event follows
    showMsg(msgNode, `Line against ${p.core} set to ${formatCny(p.amount)}.`, 'ok');
  } else {
    state.bulkCancel = true;   // until the next status: its done messages go to the activity
    showMsg(msgNode, 'All resting bids cancelled.', 'ok');
  }
}

function cancelAll() {
  if (send({ type: 'cancel_all' })) {
    state.unnamed.push({ kind: 'cancel_all' });
    showMsg($('orders-msg'), 'Cancelling all bids…', 'info');
  }
}

function addActivity(text) {
  const box = $('activity');
  box.prepend(el('p', {}, text));
  while (box.children.length > 5) box.lastChild.remove();
}

// ---- Wiring -----------------------------------------------------------------------

// The service stopped before it knew the command to be recorded, and refuses everything
// until it restarts. As for a lost connection, the note says so and the truth comes after
// the reconnect (an SME's ask is read back then, never sent again: it may have lent).
function onUnconfirmed(msg) {
  const text = 'Not confirmed: the service stopped before this was recorded. See the list once it is back.';
  const p = msg.client_id === null ? state.unnamed.shift() : takePending(msg.client_id);
  if (!p) return notify(text);
  showMsg(p.msg ?? $(p.kind === 'line' ? 'line-msg' : 'orders-msg'), text, 'info');
}

const handlers = {
  welcome: onWelcome, book: onBook, quote: onQuote, accepted: onAccepted, rejected: onRejected,
  fill: onFill, fills: onFills, done: onDone, status: onStatus, error: onError, line: onLine,
  suspension: onSuspension, unconfirmed: onUnconfirmed,
};

function init() {
  $('signin-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('key').value.trim();
    if (!key) return showMsg($('signin-msg'), 'Enter your API key.');
    signIn(key);
    $('key').value = '';
  });
  $('sign-out').addEventListener('click', signOut);
  $('notice-close').addEventListener('click', () => { $('notice').hidden = true; });
  $('sme-form').addEventListener('submit', onFinanceSubmit);
  $('sme-amount').addEventListener('input', onSmeInput);
  $('sme-segment').addEventListener('change', onSmeInput);
  $('sme-quotes').addEventListener('change', () => showMsg($('sme-msg'), ''));
  bindAmountField($('sme-amount'), $('sme-amount-hint'));
  $('bid-form').addEventListener('submit', onBidSubmit);
  bindAmountField($('bid-amount'), $('bid-hint'));
  $('bid-rate').addEventListener('blur', () => {
    const r = parseDecimal($('bid-rate').value, 2);
    if (!r.error && r.value > 0n) $('bid-rate').value = formatRate(Number(r.value)).slice(0, -1);
  });
  $('line-form').addEventListener('submit', onLineSubmit);
  $('cancel-all').addEventListener('click', cancelAll);
  bindAmountField($('line-amount'), null, (t) => parseAmount(t, { max: MAX_LINE_FEN, allowZero: true }));
  renderQuotes();
}

init();
