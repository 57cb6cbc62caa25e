# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False, annotation_typing=False
#
# The order book in C: one `Book` per segment, matching funders' rate bids against SMEs'
# financing asks in price-time priority (the rules are in docs/book.md).
#
# Layout. Orders live in one pool array of C structs, addressed by int32 slot and
# recycled through a free list; an open-addressing map turns order ids into slots. Each
# side is a sorted array of price levels, each level a doubly-linked FIFO of slots.
# Levels are sorted by a key that grows toward the better price (-rate for bids, rate for
# asks), so the best level is always the LAST one: taking or emptying it never moves the
# others. Funders' credit lines are a separate table (`CreditLines`) that the books of
# one core enterprise share; the matching loop reads it directly, no Python per bid.
#
# Matching is plan-then-execute: a plan walks the book without changing it and lists
# (slot, quantity) pairs; execute applies them. FOK, quotes and real matching are the
# same walk, so they cannot disagree.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from cpython cimport array
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t
from libc.string cimport memcpy, memmove

from matcher._idmap cimport IdMap, idmap_alloc, idmap_del, idmap_free, idmap_get, idmap_put

import array as _array_module
from operator import length_hint

from matcher.types import MAX_AMOUNT, MAX_LINE, BatchError, Fill, Order, OrderError, Quote

cdef enum:
    BID = 0
    ASK = 1

cdef enum:
    GTC = 0
    DAY = 1
    IOC = 2
    FOK = 3

cdef enum:
    OP_BID = 1
    OP_ASK = 2
    OP_CANCEL = 3
    OP_AMEND = 4
    OP_EXPIRE_DAY = 5
    WORDS = 8          # int64 words per batch command
    FILL_WORDS = 7     # int64 words per fill record

cdef int64_t C_MAX_AMOUNT = MAX_AMOUNT
cdef int64_t C_MAX_LINE = MAX_LINE
cdef int32_t C_MAX_RATE_CAP = 1_000_000
_TIF_NAMES = ("gtc", "day", "ioc", "fok")
_SIDE_NAMES = ("bid", "ask")
_new_tuple = tuple.__new__
cdef array.array _FILL_TEMPLATE = _array_module.array("q")


cdef struct COrder:
    int64_t id
    int64_t owner
    int64_t remaining
    int64_t min_ticket
    int32_t rate          # bid rate, or ask max rate
    int32_t prev          # neighbours in the level's FIFO, -1 at the ends
    int32_t next          # also links the free list
    int32_t credit        # the funder's slot in the credit table, -1 without one
    uint8_t side
    uint8_t tif
    uint8_t single        # single-funder ask
    uint8_t mark          # scratch: taken whole by the plan being built


cdef struct Level:
    int64_t total
    int32_t key           # grows toward the better price: -rate for bids, rate for asks
    int32_t rate
    int32_t count
    int32_t head
    int32_t tail


# --- Scratch shared by every book --------------------------------------------------
# The engine is single-threaded and a book never calls out to Python while it uses
# these, so one set of buffers serves all books and an empty book stays small.

cdef struct Step:
    int32_t slot
    int64_t qty

cdef struct Scratch:
    Step* plan             # the (slot, quantity) pairs of the plan being built
    Py_ssize_t plan_n
    Py_ssize_t plan_cap
    int32_t* partial       # resting bids this command partially filled
    Py_ssize_t partial_n
    Py_ssize_t partial_cap
    int64_t* fills         # FILL_WORDS per fill
    Py_ssize_t fills_n
    Py_ssize_t fills_cap
    int64_t walked         # resting orders visited by matching, quotes and depth: `walked()`

cdef Scratch S


def walked() -> int:
    """How many resting orders the books have visited so far, all books together: what a
    command cost beyond its own, read before and after it. A walk visits orders that
    cannot trade too (their funder's line used up, a `min_ticket` above what is asked),
    so its length is not bounded by what the command does (docs/book.md)."""
    return S.walked


cdef int _grow(void** p, Py_ssize_t* cap, Py_ssize_t need, size_t item) except -1:
    cdef Py_ssize_t new_cap = cap[0] if cap[0] else 64
    cdef void* q
    if need <= cap[0]:
        return 0
    while new_cap < need:
        new_cap *= 2
    q = PyMem_RawRealloc(p[0], new_cap * item)
    if q == NULL:
        raise MemoryError()
    p[0] = q
    cap[0] = new_cap
    return 0


cdef inline Py_ssize_t _map_cap(Py_ssize_t n) noexcept:
    """The capacity at which an IdMap holds `n` keys without growing (it grows at half)."""
    cdef Py_ssize_t cap = 8
    while cap < 2 * n + 2:
        cap *= 2
    return cap


cdef inline int _plan_push(int32_t slot, int64_t qty) except -1:
    if S.plan_n == S.plan_cap:
        _grow(<void**>&S.plan, &S.plan_cap, S.plan_n + 1, sizeof(Step))
    S.plan[S.plan_n].slot = slot
    S.plan[S.plan_n].qty = qty
    S.plan_n += 1
    return 0


cdef inline int64_t fill_qty(int64_t r, int64_t m, int64_t left, int64_t a,
                             bint single) noexcept nogil:
    """What a bid (remaining r, min_ticket m, credit left) can lend an ask (remaining a)."""
    cdef int64_t q, floor
    if single:
        if r < a or left < a:
            return 0
        q = a
    else:
        q = r if r < a else a
        if left < q:
            q = left
    floor = m if m < r else r
    if floor < 1:
        floor = 1
    return q if q >= floor else 0


# --- Validation -------------------------------------------------------------------

cdef int64_t _int_in(object value, int64_t lo, int64_t hi, str field) except -1:
    """`value` as an int64 in [lo, hi] (lo >= 0), or OrderError naming `field`."""
    cdef int overflow = 0
    cdef long long v
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise OrderError(field, "not_int", f"must be an integer, got {type(value).__name__}")
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < lo or v > hi:
        raise OrderError(field, "out_of_range", f"must be in [{lo}, {hi}], got {value!r}")
    return v


cdef int _check(int64_t v, int64_t lo, int64_t hi, str field) except -1:
    if v < lo or v > hi:
        raise OrderError(field, "out_of_range", f"must be in [{lo}, {hi}], got {v}")
    return 0


cdef int _tif_code(object tif) except -1:
    if tif == "gtc":
        return GTC
    if tif == "ioc":
        return IOC
    if tif == "day":
        return DAY
    if tif == "fok":
        return FOK
    raise OrderError("tif", "bad_tif", f"must be one of gtc, day, ioc, fok, got {tif!r}")


# --- Credit lines -----------------------------------------------------------------

cdef class CreditLines:
    """How much each funder may still lend against one core enterprise.

    The books of one core enterprise share one table, so a funder's fills in every
    tenor count against the same line. A funder without a line has none: it cannot
    lend until one is set. Lowering a line below what is used stops new fills and
    cancels nothing.
    """

    cdef IdMap index          # funder -> slot
    cdef int64_t* funder
    cdef int64_t* line
    cdef int64_t* used
    cdef int64_t* planned     # scratch: taken by the plan being built
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __dealloc__(self):
        idmap_free(&self.index)
        PyMem_RawFree(self.funder)
        PyMem_RawFree(self.line)
        PyMem_RawFree(self.used)
        PyMem_RawFree(self.planned)

    cdef inline int32_t find(self, int64_t funder) noexcept:
        return idmap_get(&self.index, funder)

    cdef int32_t slot(self, int64_t funder) except -1:
        """The funder's slot, created with a zero line when new."""
        cdef int32_t s = idmap_get(&self.index, funder)
        cdef Py_ssize_t cap
        cdef int64_t** columns[4]
        if s >= 0:
            return s
        if self.n == self.cap:
            columns[0] = &self.funder
            columns[1] = &self.line
            columns[2] = &self.used
            columns[3] = &self.planned
            for i in range(4):   # parallel columns, grown to the same capacity
                cap = self.cap
                _grow(<void**>columns[i], &cap, self.n + 1, sizeof(int64_t))
            self.cap = cap
        s = <int32_t>self.n
        idmap_put(&self.index, funder, s)
        self.funder[s] = funder
        self.line[s] = 0
        self.used[s] = 0
        self.planned[s] = 0
        self.n += 1
        return s

    cdef inline int64_t left(self, int32_t s) noexcept:
        cdef int64_t v
        if s < 0:
            return 0
        v = self.line[s] - self.used[s] - self.planned[s]
        return v if v > 0 else 0

    def set(self, funder: int, line: int) -> None:
        """Set the funder's total line (fen) against this core enterprise."""
        cdef int64_t f = _int_in(funder, 0, INT64_MAX, "funder")
        cdef int64_t v = _int_in(line, 0, C_MAX_LINE, "line")
        self.line[self.slot(f)] = v

    def repay(self, funder: int, amount: int) -> None:
        """Take `amount` (fen) repaid off what the funder has lent: as much of its line
        is free again. More than is lent is refused, changing nothing."""
        cdef int64_t f = _int_in(funder, 0, INT64_MAX, "funder")
        cdef int32_t s = self.find(f)
        cdef int64_t v = _int_in(amount, 0, self.used[s] if s >= 0 else 0, "amount")
        if v:
            self.used[s] -= v

    def restore(self, funder: int, line: int, used: int) -> None:
        """Set line and used at once, for rebuilding from a snapshot."""
        cdef int64_t f = _int_in(funder, 0, INT64_MAX, "funder")
        cdef int64_t v = _int_in(line, 0, C_MAX_LINE, "line")
        cdef int64_t u = _int_in(used, 0, INT64_MAX, "used")
        cdef int32_t s = self.slot(f)
        self.line[s] = v
        self.used[s] = u

    def get(self, funder: int) -> tuple[int, int]:
        """(line, used) of the funder; (0, 0) when it has none."""
        cdef int32_t s = self.find(_int_in(funder, 0, INT64_MAX, "funder"))
        if s < 0:
            return (0, 0)
        return (self.line[s], self.used[s])

    def items(self) -> list[tuple[int, int, int]]:
        """Every (funder, line, used) with a line or a use, by funder.

        A funder with neither is the same as one never seen (a bid may have made it a
        slot), so it is left out: two tables that lend alike list alike.
        """
        return sorted([(self.funder[i], self.line[i], self.used[i]) for i in range(self.n)
                       if self.line[i] or self.used[i]])


# --- The book ---------------------------------------------------------------------

cdef class Book:
    """One segment's market. See docs/book.md for the rules it implements."""

    cdef COrder* pool
    cdef int32_t pool_cap
    cdef int32_t pool_top        # slots handed out at least once
    cdef int32_t free_head
    cdef int32_t resting
    cdef IdMap ids
    cdef Level* lv[2]
    cdef int32_t lv_n[2]
    cdef int32_t lv_cap[2]
    cdef int32_t cap
    cdef readonly CreditLines credit

    def __cinit__(self, rate_cap_bps: int = 3600, credit: CreditLines | None = None):
        self.cap = <int32_t>_int_in(rate_cap_bps, 0, C_MAX_RATE_CAP, "rate_cap_bps")
        self.credit = credit
        self.free_head = -1

    def __dealloc__(self):
        PyMem_RawFree(self.pool)
        PyMem_RawFree(self.lv[0])
        PyMem_RawFree(self.lv[1])
        idmap_free(&self.ids)

    @property
    def rate_cap_bps(self) -> int:
        return self.cap

    # --- levels and the pool ---

    cdef inline Py_ssize_t _level(self, int side, int32_t rate) noexcept:
        """Index of the level at `rate`, or -(insertion point) - 1."""
        cdef int32_t key = -rate if side == BID else rate
        cdef Level* lv = self.lv[side]
        cdef Py_ssize_t lo = 0, hi = self.lv_n[side], mid
        # Most traffic is at or near the best level, which is last.
        if hi and lv[hi - 1].key == key:
            return hi - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if lv[mid].key < key:
                lo = mid + 1
            elif lv[mid].key > key:
                hi = mid
            else:
                return mid
        return -lo - 1

    cdef int _reserve_level(self, int side) except -1:
        """Make room for one more level on `side`, so that `_link` cannot fail."""
        cdef Py_ssize_t cap = self.lv_cap[side]
        if self.lv_n[side] == cap:
            _grow(<void**>&self.lv[side], &cap, cap + 1, sizeof(Level))
            self.lv_cap[side] = <int32_t>cap
        return 0

    cdef void _link(self, int32_t s) noexcept:
        """Append order `s` to the back of its level, creating the level if needed."""
        cdef COrder* o = &self.pool[s]
        cdef int side = o.side
        cdef Py_ssize_t li = self._level(side, o.rate), n
        cdef Level* lv
        if li < 0:
            li = -li - 1
            n = self.lv_n[side]
            lv = self.lv[side]
            memmove(&lv[li + 1], &lv[li], (n - li) * sizeof(Level))
            lv[li].total = 0
            lv[li].key = -o.rate if side == BID else o.rate
            lv[li].rate = o.rate
            lv[li].count = 0
            lv[li].head = -1
            lv[li].tail = -1
            self.lv_n[side] += 1
        lv = &self.lv[side][li]
        o.prev = lv.tail
        o.next = -1
        if lv.tail >= 0:
            self.pool[lv.tail].next = s
        else:
            lv.head = s
        lv.tail = s
        lv.count += 1
        lv.total += o.remaining

    cdef void _unlink(self, int32_t s, Py_ssize_t li) noexcept:
        """Take order `s` out of level `li`, dropping the level when it empties."""
        cdef COrder* o = &self.pool[s]
        cdef Level* lv = &self.lv[o.side][li]
        if o.prev >= 0:
            self.pool[o.prev].next = o.next
        else:
            lv.head = o.next
        if o.next >= 0:
            self.pool[o.next].prev = o.prev
        else:
            lv.tail = o.prev
        lv.count -= 1
        lv.total -= o.remaining
        if lv.count == 0:
            memmove(lv, lv + 1, (self.lv_n[o.side] - li - 1) * sizeof(Level))
            self.lv_n[o.side] -= 1

    cdef int32_t _new_slot(self) except -1:
        cdef int32_t s
        cdef Py_ssize_t cap
        if self.free_head >= 0:
            s = self.free_head
            self.free_head = self.pool[s].next
            return s
        if self.pool_top == self.pool_cap:
            if self.pool_cap >= 0x40000000:
                raise MemoryError("a book holds at most 2**30 orders")
            cap = self.pool_cap
            _grow(<void**>&self.pool, &cap, self.pool_cap + 1, sizeof(COrder))
            self.pool_cap = <int32_t>cap
        s = self.pool_top
        self.pool_top += 1
        return s

    cdef int _rest(self, int64_t oid, int side, int64_t owner, int32_t rate,
                   int64_t amount, int64_t min_ticket, int tif, bint single) except -1:
        """Put a new order at the back of its level."""
        cdef int32_t credit_slot = -1
        cdef int32_t s
        cdef COrder* o
        if side == BID and self.credit is not None:
            credit_slot = self.credit.slot(owner)
        # Everything that can fail (allocation) happens before the book changes.
        self._reserve_level(side)
        s = self._new_slot()
        try:
            idmap_put(&self.ids, oid, s)
        except MemoryError:
            self._free_slot(s)
            raise
        o = &self.pool[s]
        o.id = oid
        o.owner = owner
        o.remaining = amount
        o.min_ticket = min_ticket
        o.rate = rate
        o.credit = credit_slot
        o.side = <uint8_t>side
        o.tif = <uint8_t>tif
        o.single = single
        o.mark = 0
        self._link(s)
        self.resting += 1
        return 0

    cdef void _remove(self, int32_t s, Py_ssize_t li) noexcept:
        cdef COrder* o = &self.pool[s]
        self._unlink(s, li)
        idmap_del(&self.ids, o.id)
        self._free_slot(s)
        self.resting -= 1

    cdef void _free_slot(self, int32_t s) noexcept:
        self.pool[s].next = self.free_head
        self.free_head = s

    cdef bint _reduce(self, int32_t s, int64_t q) noexcept:
        """Take `q` from resting order `s`; False when that leaves it empty (removed)."""
        cdef COrder* o = &self.pool[s]
        cdef Py_ssize_t li = self._level(o.side, o.rate)
        self.lv[o.side][li].total -= q
        o.remaining -= q
        if o.remaining == 0:
            self._remove(s, li)
            return False
        return True

    cdef inline int64_t _left(self, int32_t credit_slot) noexcept:
        if self.credit is None:
            return INT64_MAX
        return self.credit.left(credit_slot)

    # --- plan and execute ---

    cdef int64_t _plan_vs_bids(self, int32_t limit, int64_t amount, bint single) except -1:
        """The fills an ask aggressor would take, best bid first; changes nothing."""
        cdef Level* lv = self.lv[BID]
        cdef Py_ssize_t li = self.lv_n[BID] - 1, i
        cdef int64_t rem = amount, q
        cdef int32_t s
        cdef COrder* o
        cdef CreditLines cr = self.credit
        cdef bint done = False
        S.plan_n = 0
        try:
            while li >= 0 and lv[li].rate <= limit and not done:
                s = lv[li].head
                while s >= 0:
                    o = &self.pool[s]
                    S.walked += 1
                    q = fill_qty(o.remaining, o.min_ticket, self._left(o.credit), rem, single)
                    if q > 0:
                        _plan_push(s, q)
                        rem -= q
                        if cr is not None:
                            cr.planned[o.credit] += q   # the funder's other bids see less
                        if single or rem == 0:
                            done = True
                            break
                    s = o.next
                li -= 1
        finally:
            if cr is not None:
                for i in range(S.plan_n):
                    cr.planned[self.pool[S.plan[i].slot].credit] = 0
        return amount - rem

    cdef int _scan_asks(self, int32_t rate, int64_t* rem, int64_t min_ticket,
                        int64_t* left) except -1:
        """One pass of a bid aggressor over the asks. 1: rescan, when a fill after a skip
        left the bid below its min_ticket. Only that lowers the floor `max(1, min(m, r))`
        and can make a skipped ask fillable (a fill only shrinks `r` and the line), so
        only then is a skipped ask worth another look; and from there each fill takes
        all the bid has left, so there is at most one rescan. A rescan after every fill
        walked the skipped asks once per fill: a bid of min_ticket 1,000,000 behind
        1,000 smaller asks walked them again for each larger ask it filled."""
        cdef Level* lv = self.lv[ASK]
        cdef Py_ssize_t li = self.lv_n[ASK] - 1
        cdef int32_t s
        cdef COrder* o
        cdef int64_t q
        cdef bint skipped = False
        while li >= 0 and lv[li].rate >= rate:
            s = lv[li].head
            while s >= 0:
                o = &self.pool[s]
                S.walked += 1
                if not o.mark:
                    q = fill_qty(rem[0], min_ticket, left[0], o.remaining, o.single)
                    if q == 0:
                        skipped = True
                    else:
                        _plan_push(s, q)
                        o.mark = 1
                        rem[0] -= q
                        left[0] -= q
                        if rem[0] == 0 or left[0] == 0:
                            return 0
                        if skipped and rem[0] < min_ticket:
                            return 1
                s = o.next
            li -= 1
        return 0

    cdef int64_t _plan_vs_asks(self, int32_t rate, int64_t amount, int64_t min_ticket,
                               int64_t left) except -1:
        """The fills a bid aggressor would take, best ask first; changes nothing."""
        cdef int64_t rem = amount
        cdef Py_ssize_t i
        cdef int64_t floor = min_ticket if min_ticket < amount else amount
        S.plan_n = 0
        if left < floor or left < 1:
            # No ask can take less than the floor, and the line cannot lend it: nothing
            # to walk (a funder with 10,000 such bids walked every ask for each one of
            # them on every line it set; found in an audit).
            return 0
        try:
            while self._scan_asks(rate, &rem, min_ticket, &left):
                pass
        finally:
            for i in range(S.plan_n):
                self.pool[S.plan[i].slot].mark = 0
        return amount - rem

    cdef int _execute(self, int side, int64_t aid, int64_t owner, int32_t rate,
                      int32_t aslot, int32_t acredit, int64_t cmd) except -1:
        """Apply the plan for an aggressor on `side`; `aslot` >= 0 when it rests here."""
        cdef Py_ssize_t i, n = S.plan_n
        cdef int32_t s, c
        cdef int64_t q, total = 0
        cdef int64_t* f
        cdef COrder* o
        # Reserve first, so nothing below can fail halfway.
        _grow(<void**>&S.fills, &S.fills_cap, (S.fills_n + n) * FILL_WORDS, sizeof(int64_t))
        _grow(<void**>&S.partial, &S.partial_cap, S.partial_n + n, sizeof(int32_t))
        for i in range(n):
            s = S.plan[i].slot
            q = S.plan[i].qty
            o = &self.pool[s]
            f = &S.fills[S.fills_n * FILL_WORDS]
            S.fills_n += 1
            f[0] = cmd
            f[6] = q
            if side == BID:
                f[1] = aid
                f[2] = o.id
                f[3] = owner
                f[4] = o.owner
                f[5] = rate
                c = acredit
            else:
                f[1] = o.id
                f[2] = aid
                f[3] = o.owner
                f[4] = owner
                f[5] = o.rate
                c = o.credit
            if self.credit is not None:
                self.credit.used[c] += q
            total += q
            if self._reduce(s, q) and side == ASK:
                S.partial[S.partial_n] = s
                S.partial_n += 1
        if aslot >= 0 and total:
            self._reduce(aslot, total)
        return 0

    cdef inline bint _crosses_asks(self, int32_t rate) noexcept:
        cdef int32_t n = self.lv_n[ASK]
        return n > 0 and self.lv[ASK][n - 1].rate >= rate

    cdef inline bint _crosses_bids(self, int32_t limit) noexcept:
        cdef int32_t n = self.lv_n[BID]
        return n > 0 and self.lv[BID][n - 1].rate <= limit

    cdef int _rematch(self, int64_t cmd) except -1:
        """Re-match the resting bids this command partially filled (step 5)."""
        cdef Py_ssize_t i
        cdef int32_t s
        cdef COrder* o
        for i in range(S.partial_n):
            s = S.partial[i]
            o = &self.pool[s]
            if self._crosses_asks(o.rate) and self._plan_vs_asks(
                    o.rate, o.remaining, o.min_ticket, self._left(o.credit)):
                self._execute(BID, o.id, o.owner, o.rate, s, o.credit, cmd)
        S.partial_n = 0
        return 0

    # --- commands on validated values ---

    cdef int _bid(self, int64_t oid, int64_t funder, int32_t rate, int64_t amount,
                  int64_t min_ticket, int tif, int64_t cmd) except -1:
        cdef int64_t filled = 0, left = INT64_MAX
        cdef int32_t credit_slot = -1
        if idmap_get(&self.ids, oid) >= 0:
            raise OrderError("order_id", "duplicate", f"{oid} is already resting")
        if self._crosses_asks(rate):
            if self.credit is not None:
                credit_slot = self.credit.find(funder)
                left = self.credit.left(credit_slot)
            filled = self._plan_vs_asks(rate, amount, min_ticket, left)
            if tif == FOK and filled < amount:
                return 0
            self._execute(BID, oid, funder, rate, -1, credit_slot, cmd)
        elif tif == FOK:
            return 0
        if filled < amount and (tif == GTC or tif == DAY):
            self._rest(oid, BID, funder, rate, amount - filled, min_ticket, tif, False)
        return 0

    cdef int _ask(self, int64_t oid, int64_t sme, int32_t limit, int64_t amount, int tif,
                  bint single, int64_t cmd) except -1:
        cdef int64_t filled = 0
        if idmap_get(&self.ids, oid) >= 0:
            raise OrderError("order_id", "duplicate", f"{oid} is already resting")
        S.partial_n = 0
        if self._crosses_bids(limit):
            filled = self._plan_vs_bids(limit, amount, single)
            if tif == FOK and filled < amount:
                return 0
            self._execute(ASK, oid, sme, limit, -1, -1, cmd)
        elif tif == FOK:
            return 0
        if filled < amount and (tif == GTC or tif == DAY):
            self._rest(oid, ASK, sme, limit, amount - filled, 0, tif, single)
        self._rematch(cmd)
        return 0

    cdef int32_t _slot_of(self, int64_t oid) except -1:
        cdef int32_t s = idmap_get(&self.ids, oid)
        if s < 0:
            raise KeyError(oid)
        return s

    cdef int64_t _cancel(self, int64_t oid) except -1:
        cdef int32_t s = self._slot_of(oid)
        cdef COrder* o = &self.pool[s]
        cdef int64_t rem = o.remaining
        self._remove(s, self._level(o.side, o.rate))
        return rem

    cdef int _amend(self, int64_t oid, int32_t rate, int64_t amount, int64_t cmd) except -1:
        """Amend to `rate` and `amount` (-1: unchanged) then match from where it stands."""
        cdef int32_t s = self._slot_of(oid)
        cdef COrder* o = &self.pool[s]
        cdef Py_ssize_t li
        self._reserve_level(o.side)
        o = &self.pool[s]
        if rate < 0:
            rate = o.rate
        if amount < 0:
            amount = o.remaining
        li = self._level(o.side, o.rate)
        if rate == o.rate and amount <= o.remaining:
            self.lv[o.side][li].total -= o.remaining - amount   # keeps its place
            o.remaining = amount
        else:
            self._unlink(s, li)                                  # back of the new level
            o.rate = rate
            o.remaining = amount
            self._link(s)
        S.partial_n = 0
        if o.side == BID:
            if self._crosses_asks(o.rate) and self._plan_vs_asks(
                    o.rate, o.remaining, o.min_ticket, self._left(o.credit)):
                self._execute(BID, o.id, o.owner, o.rate, s, o.credit, cmd)
        elif self._crosses_bids(o.rate) and self._plan_vs_bids(o.rate, o.remaining, o.single):
            self._execute(ASK, o.id, o.owner, o.rate, s, -1, cmd)
            self._rematch(cmd)
        return 0

    cdef list _expire_day(self):
        cdef list ids = []
        cdef int side
        cdef Py_ssize_t li
        cdef int32_t s
        for side in range(2):
            for li in range(self.lv_n[side]):
                s = self.lv[side][li].head
                while s >= 0:
                    if self.pool[s].tif == DAY:
                        ids.append(self.pool[s].id)
                    s = self.pool[s].next
        ids.sort()
        for oid in ids:
            self._cancel(oid)
        return ids

    # --- fills out ---

    cdef list _take_fills(self):
        cdef list out = []
        cdef Py_ssize_t i
        cdef int64_t* f
        for i in range(S.fills_n):
            f = &S.fills[i * FILL_WORDS]
            out.append(_new_tuple(Fill, (f[1], f[2], f[3], f[4], f[5], f[6])))
        S.fills_n = 0
        return out

    cdef array.array _take_packed_fills(self):
        cdef array.array out = array.clone(_FILL_TEMPLATE, S.fills_n * FILL_WORDS, zero=False)
        memcpy(out.data.as_voidptr, S.fills, S.fills_n * FILL_WORDS * 8)
        S.fills_n = 0
        return out

    # --- the public API ---

    def bid(self, order_id, funder, rate_bps, amount, *, min_ticket=0, tif="gtc"):
        """A funder offers to lend up to `amount` fen at `rate_bps`. Returns the fills."""
        cdef int64_t oid = _int_in(order_id, 0, INT64_MAX, "order_id")
        cdef int64_t f = _int_in(funder, 0, INT64_MAX, "funder")
        cdef int64_t r = _int_in(rate_bps, 0, self.cap, "rate_bps")
        cdef int64_t a = _int_in(amount, 1, C_MAX_AMOUNT, "amount")
        cdef int64_t m = _int_in(min_ticket, 0, C_MAX_AMOUNT, "min_ticket")
        cdef int t = _tif_code(tif)
        S.fills_n = 0
        self._bid(oid, f, <int32_t>r, a, m, t, 0)
        return self._take_fills() if S.fills_n else []

    def ask(self, order_id, sme, max_rate_bps, amount, *, tif="ioc", single_funder=False):
        """An SME asks to borrow `amount` fen at no more than `max_rate_bps` (None: any)."""
        cdef int64_t oid = _int_in(order_id, 0, INT64_MAX, "order_id")
        cdef int64_t o = _int_in(sme, 0, INT64_MAX, "sme")
        cdef int64_t r = (self.cap if max_rate_bps is None
                          else _int_in(max_rate_bps, 0, self.cap, "max_rate_bps"))
        cdef int64_t a = _int_in(amount, 1, C_MAX_AMOUNT, "amount")
        cdef int t = _tif_code(tif)
        S.fills_n = 0
        self._ask(oid, o, <int32_t>r, a, t, bool(single_funder), 0)
        return self._take_fills() if S.fills_n else []

    def cancel(self, order_id) -> int:
        """Remove a resting order; returns the amount it still had. KeyError if none."""
        return self._cancel(_int_in(order_id, 0, INT64_MAX, "order_id"))

    def amend(self, order_id, *, rate_bps=None, amount=None):
        """Change a resting order's rate and/or remaining amount; returns the fills."""
        cdef int64_t oid = _int_in(order_id, 0, INT64_MAX, "order_id")
        cdef int64_t r = -1, a = -1
        self._slot_of(oid)
        if rate_bps is not None:
            r = _int_in(rate_bps, 0, self.cap, "rate_bps")
        if amount is not None:
            a = _int_in(amount, 1, C_MAX_AMOUNT, "amount")
        if rate_bps is None and amount is None:
            raise OrderError("amount", "missing", "give rate_bps or amount to amend")
        S.fills_n = 0
        self._amend(oid, <int32_t>r, a, 0)
        return self._take_fills() if S.fills_n else []

    def rematch(self, funder) -> list:
        """Match the funder's resting bids again, best first; returns the fills.

        Only a credit line that rose can make a resting pair matchable without a new
        order (docs/book.md), so the engine calls this on every book of the core
        enterprise after raising a line.
        """
        cdef int64_t f = _int_in(funder, 0, INT64_MAX, "funder")
        cdef list ids = []
        cdef Py_ssize_t li = self.lv_n[BID] - 1
        cdef int32_t s
        cdef COrder* o
        while li >= 0 and self._crosses_asks(self.lv[BID][li].rate):
            s = self.lv[BID][li].head
            while s >= 0:
                S.walked += 1
                if self.pool[s].owner == f:
                    ids.append(self.pool[s].id)
                s = self.pool[s].next
            li -= 1
        S.fills_n = 0
        for oid in ids:
            s = idmap_get(&self.ids, <int64_t>oid)
            if s < 0:
                continue
            o = &self.pool[s]
            S.partial_n = 0
            if self._crosses_asks(o.rate) and self._plan_vs_asks(
                    o.rate, o.remaining, o.min_ticket, self._left(o.credit)):
                self._execute(BID, o.id, o.owner, o.rate, s, o.credit, 0)
        S.partial_n = 0
        return self._take_fills() if S.fills_n else []

    def expire_day(self) -> list:
        """Remove every resting DAY order; returns their ids, ascending."""
        return self._expire_day()

    def apply(self, commands) -> array.array:
        """Apply a batch of packed int64 commands (docs/book.md); returns packed fills."""
        cdef Py_buffer buf
        cdef Py_ssize_t i = 0, n
        cdef int64_t w[WORDS]
        cdef array.array out
        PyObject_GetBuffer(commands, &buf, PyBUF_SIMPLE)
        try:
            if buf.len % (WORDS * 8):
                raise ValueError(f"commands: {buf.len} bytes is not a whole number of "
                                 f"{WORDS}-word commands")
            n = buf.len // (WORDS * 8)
            S.fills_n = 0
            try:
                while i < n:
                    memcpy(w, <char*>buf.buf + i * WORDS * 8, WORDS * 8)
                    self._apply_one(w, i)
                    i += 1
            except (OrderError, KeyError) as e:
                raise BatchError(i, e, self._take_packed_fills()) from e
            return self._take_packed_fills()
        finally:
            PyBuffer_Release(&buf)

    cdef int _apply_one(self, int64_t* w, Py_ssize_t index) except -1:
        cdef int64_t op = w[0]
        if op == OP_BID or op == OP_ASK:
            _check(w[1], 0, INT64_MAX, "order_id")
            _check(w[2], 0, INT64_MAX, "funder" if op == OP_BID else "sme")
            if op == OP_BID or w[3] != -1:
                _check(w[3], 0, self.cap, "rate_bps" if op == OP_BID else "max_rate_bps")
            _check(w[4], 1, C_MAX_AMOUNT, "amount")
            if op == OP_BID:
                _check(w[5], 0, C_MAX_AMOUNT, "min_ticket")
            if w[6] < GTC or w[6] > FOK:
                raise OrderError("tif", "bad_tif", f"must be 0 to 3, got {w[6]}")
            if op == OP_BID:
                self._bid(w[1], w[2], <int32_t>w[3], w[4], w[5], <int>w[6], index)
            else:
                self._ask(w[1], w[2], <int32_t>(self.cap if w[3] == -1 else w[3]), w[4],
                          <int>w[6], w[7] & 1, index)
        elif op == OP_CANCEL:
            _check(w[1], 0, INT64_MAX, "order_id")
            self._cancel(w[1])
        elif op == OP_AMEND:
            _check(w[1], 0, INT64_MAX, "order_id")
            self._slot_of(w[1])
            if w[3] != -1:
                _check(w[3], 0, self.cap, "rate_bps")
            if w[4] != -1:
                _check(w[4], 1, C_MAX_AMOUNT, "amount")
            if w[3] == -1 and w[4] == -1:
                raise OrderError("amount", "missing", "give rate_bps or amount to amend")
            self._amend(w[1], <int32_t>w[3], w[4], index)
        elif op == OP_EXPIRE_DAY:
            self._expire_day()
        else:
            raise OrderError("op", "bad_op", f"must be 1 to 5, got {op}")
        return 0

    # --- reads ---

    def best_bid(self):
        """(rate_bps, amount) of the best level funders can lend at now, or None."""
        cdef list top = self._lendable(1)
        return top[0][:2] if top else None

    def depth(self, n: int = 10) -> list:
        """The funder side's best `n` levels as (rate_bps, amount, orders), counting only
        what each bid can lend now: the fills an unlimited market ask would get, by level.

        A bid whose funder's line is used up (or too short for its min_ticket) shows
        nothing; two bids of one funder show no more than its line together.
        """
        return self._lendable(_int_in(n, 0, INT64_MAX, "n"))

    cdef list _lendable(self, int64_t want):
        cdef Level* lv = self.lv[BID]
        cdef Py_ssize_t li = self.lv_n[BID] - 1, last
        cdef int64_t amount, orders, q
        cdef int32_t s
        cdef COrder* o
        cdef CreditLines cr = self.credit
        cdef list out = []
        try:
            while li >= 0 and len(out) < want:
                amount = orders = 0
                s = lv[li].head
                while s >= 0:
                    o = &self.pool[s]
                    S.walked += 1
                    q = fill_qty(o.remaining, o.min_ticket, self._left(o.credit),
                                 INT64_MAX, False)
                    if q > 0:
                        amount += q
                        orders += 1
                        if cr is not None:
                            cr.planned[o.credit] += q   # the funder's next bids see less
                    s = o.next
                if orders:
                    out.append((lv[li].rate, amount, orders))
                li -= 1
        finally:
            if cr is not None:       # undo the scratch over every level walked (and the
                last = li            # one being walked, if an exception left it early)
                li = self.lv_n[BID] - 1
                while li >= last and li >= 0:
                    s = lv[li].head
                    while s >= 0:
                        if self.pool[s].credit >= 0:
                            cr.planned[self.pool[s].credit] = 0
                        s = self.pool[s].next
                    li -= 1
        return out

    def demand(self) -> tuple:
        """(amount, orders) over all resting SME asks."""
        cdef int64_t total = 0, count = 0
        cdef Py_ssize_t li
        for li in range(self.lv_n[ASK]):
            total += self.lv[ASK][li].total
            count += self.lv[ASK][li].count
        return (total, count)

    def quote(self, amount, *, single_funder=False):
        """What an IOC market ask of `amount` would get now; changes nothing."""
        cdef int64_t a = _int_in(amount, 1, C_MAX_AMOUNT, "amount")
        cdef int64_t filled, weighted = 0, worst = 0
        cdef Py_ssize_t i
        cdef COrder* o
        if not self._crosses_bids(self.cap):
            return None
        filled = self._plan_vs_bids(self.cap, a, bool(single_funder))
        if filled == 0:
            return None
        funders = set()
        for i in range(S.plan_n):
            o = &self.pool[S.plan[i].slot]
            weighted += o.rate * S.plan[i].qty
            if o.rate > worst:
                worst = o.rate
            funders.add(o.owner)
        # Python ints divide exactly rounded, as the reference does.
        return Quote(filled, (<object>weighted) / (<object>filled), worst, len(funders))

    def order(self, order_id):
        """The resting order with that id, or None."""
        cdef int32_t s = idmap_get(&self.ids, _int_in(order_id, 0, INT64_MAX, "order_id"))
        if s < 0:
            return None
        return self._order_at(s)

    cdef object _order_at(self, int32_t s):
        cdef COrder* o = &self.pool[s]
        return _new_tuple(Order, (o.id, _SIDE_NAMES[o.side], o.owner, o.rate, o.remaining,
                                  o.min_ticket, _TIF_NAMES[o.tif], bool(o.single)))

    def orders(self) -> list:
        """Every resting order in priority order: bids best first, then asks best first.

        Feeding this list to `restore` on an empty book rebuilds the same queues.
        """
        cdef list out = []
        cdef int side
        cdef Py_ssize_t li
        cdef int32_t s
        for side in range(2):
            li = self.lv_n[side] - 1
            while li >= 0:
                s = self.lv[side][li].head
                while s >= 0:
                    out.append(self._order_at(s))
                    s = self.pool[s].next
                li -= 1
        return out

    def restore(self, orders) -> None:
        """Append resting orders (as from `orders()`) at the back of their levels, unmatched,
        all or none: every order is checked (fields, an id already resting or given twice)
        and staged before the first goes in, so a refusal leaves the book as it was."""
        cdef COrder* staged = NULL
        cdef Py_ssize_t hint, cap = 0, n = 0, done = 0
        cdef IdMap given            # the ids staged so far, used as a set
        cdef COrder* o
        cdef int64_t oid
        given.cells = NULL
        given.cap = 0
        given.size = 0
        try:
            # One pass of checks, reading each order once (`orders` may be a generator).
            hint = length_hint(orders)
            if hint:
                _grow(<void**>&staged, &cap, hint, sizeof(COrder))
                idmap_alloc(&given, _map_cap(hint))
            for order in orders:
                oid = _int_in(order.order_id, 0, INT64_MAX, "order_id")
                if idmap_get(&self.ids, oid) >= 0:
                    raise OrderError("order_id", "duplicate", f"{oid} is already resting")
                if idmap_get(&given, oid) >= 0:
                    raise OrderError("order_id", "duplicate", f"{oid} is given twice")
                idmap_put(&given, oid, 0)
                if n == cap:
                    _grow(<void**>&staged, &cap, n + 1, sizeof(COrder))
                o = &staged[n]
                o.id = oid
                o.side = BID if order.side == "bid" else ASK
                o.owner = _int_in(order.owner, 0, INT64_MAX, "owner")
                o.rate = <int32_t>_int_in(order.rate_bps, 0, self.cap, "rate_bps")
                o.remaining = _int_in(order.remaining, 1, C_MAX_AMOUNT, "remaining")
                o.min_ticket = _int_in(order.min_ticket, 0, C_MAX_AMOUNT, "min_ticket")
                o.tif = <uint8_t>_tif_code(order.tif)
                o.single = bool(order.single_funder)
                n += 1
            # One pass of inserts; only memory can run out here, and then the orders
            # already in are taken out again.
            try:
                while done < n:
                    o = &staged[done]
                    self._rest(o.id, o.side, o.owner, o.rate, o.remaining, o.min_ticket,
                               o.tif, o.single)
                    done += 1
            except MemoryError:
                while done > 0:
                    done -= 1
                    self._cancel(staged[done].id)
                raise
        finally:
            PyMem_RawFree(staged)
            idmap_free(&given)

    def __len__(self) -> int:
        return self.resting
