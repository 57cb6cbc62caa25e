# cython: language_level=3
# An int64 -> int32 hash map in plain C, for order ids -> pool slots and funders -> credit
# slots. Open addressing with linear probing and backward-shift deletion (no tombstones,
# so lookups stay short after millions of cancels); keys are non-negative, -1 marks an
# empty cell. Memory comes from PyMem_Raw* so tracemalloc sees it.

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memset
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc

cdef enum:
    IDMAP_FIRST_CAP = 8

cdef struct Cell:
    int64_t key         # -1: empty
    int32_t val

cdef struct IdMap:
    Cell* cells         # key and value side by side: one cache miss per probe
    Py_ssize_t cap      # a power of two, or 0 before the first insert
    Py_ssize_t size


cdef inline uint64_t idmap_hash(int64_t key) noexcept nogil:
    # The finaliser of MurmurHash3: ids are often sequential, this spreads them.
    cdef uint64_t x = <uint64_t>key
    x ^= x >> 33
    x *= <uint64_t>0xff51afd7ed558ccd
    x ^= x >> 33
    x *= <uint64_t>0xc4ceb9fe1a85ec53
    x ^= x >> 33
    return x


cdef inline int32_t idmap_get(const IdMap* m, int64_t key) noexcept nogil:
    """The value under `key`, or -1."""
    if m.cap == 0:
        return -1
    cdef uint64_t mask = <uint64_t>(m.cap - 1)
    cdef uint64_t i = idmap_hash(key) & mask
    cdef int64_t k
    while True:
        k = m.cells[i].key
        if k == key:
            return m.cells[i].val
        if k == -1:
            return -1
        i = (i + 1) & mask


cdef inline int idmap_alloc(IdMap* m, Py_ssize_t cap) except -1:
    m.cells = <Cell*>PyMem_RawMalloc(cap * sizeof(Cell))
    if m.cells == NULL:
        raise MemoryError()
    memset(m.cells, 0xff, cap * sizeof(Cell))   # every key -1: empty
    m.cap = cap
    m.size = 0
    return 0


cdef inline void idmap_insert_new(IdMap* m, int64_t key, int32_t val) noexcept nogil:
    # Caller guarantees room and that `key` is absent.
    cdef uint64_t mask = <uint64_t>(m.cap - 1)
    cdef uint64_t i = idmap_hash(key) & mask
    while m.cells[i].key != -1:
        i = (i + 1) & mask
    m.cells[i].key = key
    m.cells[i].val = val
    m.size += 1


cdef inline void idmap_free(IdMap* m) noexcept nogil:
    PyMem_RawFree(m.cells)
    m.cells = NULL
    m.cap = 0
    m.size = 0


cdef inline int idmap_put(IdMap* m, int64_t key, int32_t val) except -1:
    """Insert `key`, which must be absent. Grows at half full."""
    cdef IdMap grown
    cdef Py_ssize_t i
    if (m.size + 1) * 2 > m.cap:
        idmap_alloc(&grown, m.cap * 2 if m.cap else IDMAP_FIRST_CAP)
        for i in range(m.cap):
            if m.cells[i].key != -1:
                idmap_insert_new(&grown, m.cells[i].key, m.cells[i].val)
        idmap_free(m)
        m[0] = grown
    idmap_insert_new(m, key, val)
    return 0


cdef inline void idmap_set(IdMap* m, int64_t key, int32_t val) noexcept nogil:
    """Overwrite the value of a present `key`."""
    cdef uint64_t mask = <uint64_t>(m.cap - 1)
    cdef uint64_t i = idmap_hash(key) & mask
    while m.cells[i].key != key:
        i = (i + 1) & mask
    m.cells[i].val = val


cdef inline void idmap_del(IdMap* m, int64_t key) noexcept nogil:
    """Remove a present `key`, shifting its probe chain back into the hole."""
    cdef uint64_t mask = <uint64_t>(m.cap - 1)
    cdef uint64_t i = idmap_hash(key) & mask
    cdef uint64_t j, home
    while m.cells[i].key != key:
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if m.cells[j].key == -1:
            break
        home = idmap_hash(m.cells[j].key) & mask
        # The entry at j may move into the hole at i only if its home is not
        # cyclically inside (i, j].
        if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
            continue
        m.cells[i] = m.cells[j]
        i = j
    m.cells[i].key = -1
    m.size -= 1
