"""
Per-backend connection counts shared by the worker processes of one POP
(C{--workers N}): an L{ILoadCounter} whose hard limits hold across workers.

The supervisor makes one L{SharedCounters} table (an anonymous file in
shared memory) and hands its descriptor to every worker; each worker counts
its connections in it through a L{SharedLoadTable}, and the supervisor reads
the totals through a L{SharedLoadView} for its metrics and status page.

The table is a matrix of 64-bit counters, one row per worker and one column
(a I{slot}) per backend id; each worker writes only its own row, so no cell
has two writers, and a backend's count is the sum of its column.  Room
under a hard limit is taken by reading a column's sum and incrementing the
worker's own cell while holding a POSIX record lock on one byte of the file
for that slot (C{fcntl.lockf}): two workers can never both see room for the
last connection.  Record locks rather than semaphores or futexes because the
kernel releases them when the holding process dies, even by C{SIGKILL}:
a crashed worker never leaves a backend locked.  Its counts stay in its row
until the supervisor, having seen it exit, clears the row
(L{SharedCounters.clearWorker}); its connections died with it.

Releases and acquires without a hard limit take no lock: a release only
lowers a count, so a concurrent reader can only over-estimate it and refuse
a connection it could have taken, never admit one too many.

A lock per connection to a hard-limited backend cost two workers 15% of
their CPU per connection (a contended record lock sleeps), so the lock is
taken per block of room instead: a worker reserves room for up to
L{HARD_BLOCK} connections at a time in a second slot of the backend's (its
id prefixed as by L{reservedId}), under that slot's lock, and admits from
its own room without a lock.  Reservations never exceed the limit, and a
worker's connections never exceed its reservation.  The global cap is
shared the same way (the L{RESERVED_ID} slot).  Near a limit room is taken
one connection at a time and given back at once, so the last connections go
to whichever worker asks; room a worker reserved farther from it is given
back at its next release or its next refresh (0.1 s).

File layout (offsets in bytes, all little-endian int64 unless said)::

    0                 header page(s): magic, version, workers, slots; at 64,
                      one generation per worker (bumped on each of its writes)
    H                 directory: `slots` entries of 16 bytes, the blake2b
                      digest of a backend id (all zero: empty); open
                      addressing, linear probing from the digest's first 8
                      bytes (big-endian) modulo `slots`; entry 0 is never used
    H + D             counters, worker-major: cell (worker * slots + slot)

Slot 0 is the POP's global connection count (L{SharedLoadTable.acquireGlobal}).
A hard-limited backend has two slots: its connections, and its reservations.
Lock bytes (locks may lie anywhere, data or not): byte 0 guards the
directory's inserts, byte 1 + slot guards a slot's acquires and
reservations.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
from typing import Dict, Iterable, List, Mapping, Optional, Set

from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import ILoadCounter, IMetricsStore
from edgeproxy.model import Backend
from edgeproxy.routing.load import LoadTable

__all__ = [
    "GLOBAL_BLOCK",
    "GLOBAL_SLOT",
    "HARD_BLOCK",
    "RESERVED_ID",
    "SharedCounters",
    "SharedLoadTable",
    "SharedLoadView",
    "reservedId",
]

_log = Logger()

#: The slot of the POP's global connection count: never given to an id.
GLOBAL_SLOT = 0

#: The directory id of the slot where workers reserve room under the global
#: cap (see L{SharedLoadTable.acquireGlobal}); no backend id starts with NUL.
RESERVED_ID = "\x00global-reserved"

#: The most room a worker reserves under the global cap at a time.
GLOBAL_BLOCK = 64

#: The most room a worker reserves under a backend's hard limit at a time.
HARD_BLOCK = 64


def reservedId(backend_id: str) -> str:
    """
    The directory id of the slot where workers reserve room under
    C{backend_id}'s hard limit (see L{SharedLoadTable.acquire}).
    """
    return "\x00reserved\x00" + backend_id


class _Hold:
    """
    A worker's room under one backend's hard limit.

    @ivar slot: The reservation slot (C{-1}: the directory had no room, so
        the limit is checked under a lock per connection instead).
    @ivar hard: The limit the room was reserved under.
    @ivar block: How much room is reserved at a time far from the limit.
    @ivar margin: Less than this much room left unreserved is near the
        limit.
    @ivar reserved: This worker's room (its cell of C{slot}); where it is
        below the worker's open connections (they were opened without a
        limit) each acquire reserves.
    @ivar near: The group's reservations were near the limit when last
        looked at: spare room goes back at each release.
    """

    __slots__ = ("block", "hard", "margin", "near", "reserved", "slot")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.hard = 0
        self.block = 1
        self.margin = 0
        self.reserved = 0
        self.near = True


_PAGE = 4096
_MAGIC = b"EPSHLOAD"
_VERSION = 1
#: Offset of the first worker's generation in the header.
_GENERATIONS = 64
_DIGEST = 16
_EMPTY = bytes(_DIGEST)
#: Bytes of a worker's row compared at a time by L{SharedLoadTable.refresh}.
_CHUNK = 4096
_CELLS_PER_CHUNK = _CHUNK // 8
_Q = struct.Struct("<q")
_HEADER = struct.Struct("<8sqqq")


def _roundUp(n: int) -> int:
    """
    C{n} rounded up to a whole number of pages.
    """
    return -(-n // _PAGE) * _PAGE


def _digest(backend_id: str) -> bytes:
    """
    The directory key of C{backend_id}: never all zero (that marks an empty
    entry).
    """
    d = hashlib.blake2b(backend_id.encode("utf-8"), digest_size=_DIGEST).digest()
    return d if d != _EMPTY else _EMPTY[:-1] + b"\x01"


def _anonymousFile() -> int:
    """
    A descriptor of a new, empty, unnamed file in memory (close-on-exec).
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            fd: int = memfd_create("edgeproxy-load", getattr(os, "MFD_CLOEXEC", 1))
            return fd
        except OSError:
            pass  # e.g. a seccomp filter: fall back on a temporary file
    where = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="edgeproxy-load-", dir=where)
    os.unlink(path)
    return fd


class SharedCounters:
    """
    Per-worker, per-slot connection counters in shared memory (see the
    module docstring for the layout and the locking).

    Every method is for one thread of one process; a process writes only
    the row of the worker index it passes, and no two live processes may
    pass the same index.

    @ivar fd: The descriptor of the shared file (the supervisor passes it to
        each worker, e.g. with C{subprocess}'s C{pass_fds}).
    @ivar workers: Rows (worker indexes 0 to C{workers - 1}).
    @ivar slots: Columns, slot 0 (L{GLOBAL_SLOT}) included.
    @ivar size: The file's size in bytes.
    """

    def __init__(self, fd: int, workers: int, slots: int, *, initialise: bool) -> None:
        """
        Map C{fd}; use L{create} or L{attach}.
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        if slots < 2:
            raise ValueError(f"slots must be >= 2, not {slots}")
        self.fd = fd
        self.workers = workers
        self.slots = slots
        header = _roundUp(_GENERATIONS + 8 * workers)
        self._directory = header
        self._cellsAt = header + _roundUp(_DIGEST * slots)
        self.size = self._cellsAt + 8 * workers * slots
        if initialise:
            os.ftruncate(fd, self.size)
        elif os.fstat(fd).st_size < self.size:
            raise ValueError(
                f"the shared file is {os.fstat(fd).st_size} bytes; "
                f"{workers} workers and {slots} slots need {self.size}"
            )
        self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if initialise:
            self._mm[0 : _HEADER.size] = _HEADER.pack(_MAGIC, _VERSION, workers, slots)
        else:
            magic, version, w, s = _HEADER.unpack_from(self._mm, 0)
            if (magic, version, w, s) != (_MAGIC, _VERSION, workers, slots):
                self._mm.close()
                raise ValueError(
                    f"the shared file holds {w} workers x {s} slots "
                    f"(magic {magic!r}, version {version}), "
                    f"not {workers} x {slots}"
                )
        view = memoryview(self._mm)
        self._generations = view[_GENERATIONS : _GENERATIONS + 8 * workers].cast("q")
        self._cells = view[self._cellsAt : self.size].cast("q")
        view.release()
        #: Backend id -> slot, for the ids looked up or inserted here.
        self._slots: Dict[str, int] = {}
        self._fullLogged = False
        self._closed = False

    @classmethod
    def create(cls, workers: int, slots: int = 65536) -> SharedCounters:
        """
        Make a new, zeroed table in an anonymous file in memory
        (C{memfd_create}, else an unlinked file in C{/dev/shm} or the
        temporary directory), for the supervisor.

        @param workers: Worker processes that will count in it.
        @param slots: Directory entries (backend ids that can be shared,
            plus the global slot).
        """
        fd = _anonymousFile()
        try:
            return cls(fd, workers, slots, initialise=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, workers: int, slots: int) -> SharedCounters:
        """
        Map the table made by L{create} whose descriptor a worker was given;
        L{close} closes C{fd}.

        @raise ValueError: The file is no such table, or one of another
            shape.
        """
        return cls(fd, workers, slots, initialise=False)

    def close(self) -> None:
        """
        Unmap the table and close the descriptor (idempotent).  Other
        processes' mappings are unaffected.
        """
        if self._closed:
            return
        self._closed = True
        self._generations.release()
        self._cells.release()
        self._mm.close()
        os.close(self.fd)

    def __repr__(self) -> str:
        return f"<SharedCounters fd={self.fd} workers={self.workers} slots={self.slots}>"

    # The directory.

    def _probe(self, digest: bytes) -> int:
        """
        The slot holding C{digest}, or C{-(free slot) - 1} for the first
        empty entry of its probe sequence, or C{0} (never a slot of an id)
        when the directory is full without it.
        """
        mm = self._mm
        slots = self.slots
        base = self._directory
        slot = int.from_bytes(digest[:8], "big") % slots
        for _ in range(slots):
            if slot != GLOBAL_SLOT:
                at = base + slot * _DIGEST
                entry = mm[at : at + _DIGEST]
                if entry == digest:
                    return slot
                if entry == _EMPTY:
                    return -slot - 1
            slot += 1
            if slot == slots:
                slot = 0
        return 0

    def lookup(self, backend_id: str) -> int:
        """
        The slot of C{backend_id} if some process has given it one, else
        C{-1}; never inserts.
        """
        slot = self._slots.get(backend_id)
        if slot is not None:
            return slot
        found = self._probe(_digest(backend_id))
        if found > 0:
            self._slots[backend_id] = found
            return found
        return -1

    def slotFor(self, backend_id: str) -> int:
        """
        The slot of C{backend_id}, given one now if it has none (under the
        directory's lock, so that processes inserting at once agree); a
        dictionary lookup after the first call.

        @return: The slot (1 to C{slots - 1}), or C{-1} when the directory
            is full (logged once): the caller then counts this id in its
            own process only, so its hard limit holds per worker, not
            across them.  Slots are never given back: ids of backends that
            left the table keep theirs.
        """
        slot = self._slots.get(backend_id)
        if slot is not None:
            return slot
        digest = _digest(backend_id)
        found = self._probe(digest)
        if found > 0:
            self._slots[backend_id] = found
            return found
        fd = self.fd
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
        try:
            # Again under the lock: another process may have inserted it.
            found = self._probe(digest)
            if found < 0:
                found = -found - 1
                at = self._directory + found * _DIGEST
                self._mm[at : at + _DIGEST] = digest
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
        if found == 0:
            if not self._fullLogged:
                self._fullLogged = True
                _log.warn(
                    "the shared load table's {slots} slots are all taken: "
                    "{backend_id} and later new backends are counted per "
                    "worker (their hard limits hold per worker; logged once)",
                    slots=self.slots,
                    backend_id=backend_id,
                )
            self._slots[backend_id] = -1
            return -1
        self._slots[backend_id] = found
        return found

    # The counters.

    def acquire(self, slot: int, worker: int, hard: int) -> int:
        """
        Count one more connection of C{worker} in C{slot} if the slot's
        total is below C{hard} (C{hard <= 0}: no limit), in one atomic step
        across processes.

        @return: The new total (C{>= 1}) when the connection was counted;
            when the slot is full, minus the total seen (C{<= -hard}).
            Never 0.  With a limit the total is exact as of the check (read
            under the slot's lock); without one it is read without a lock
            and may be slightly stale.
        """
        cells = self._cells
        slots = self.slots
        if hard > 0:
            fd = self.fd
            start = 1 + slot
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, start)
            try:
                total = sum(cells[slot::slots])
                if total >= hard:
                    return -total
                cells[worker * slots + slot] += 1
                self._generations[worker] += 1
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, start)
            return total + 1
        cells[worker * slots + slot] += 1
        self._generations[worker] += 1
        return sum(cells[slot::slots])

    def reserve(
        self, slot: int, worker: int, limit: int, amount: int, margin: int, counted: int = -1
    ) -> int:
        """
        Add up to C{amount} to C{worker}'s cell of C{slot} while the slot's
        total stays at most C{limit}, in one atomic step across processes
        (the slot's lock): C{amount} while more than C{margin} would be
        left free, else 1 (near the limit every unit is taken alone).

        @param counted: A slot of connections that C{slot} reserves room
            for: each worker then takes up the larger of its two cells, so
            that the connections of a worker that holds no room (e.g. one
            that has not yet seen a backend gain its hard limit) count too.

        @return: How much was added (C{>= 1}); when the slot is at its
            limit, minus its total (C{<= -limit}), nothing added.
        """
        cells = self._cells
        slots = self.slots
        fd = self.fd
        start = 1 + slot
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, start)
        try:
            if counted > 0:
                total = sum(map(max, cells[slot::slots], cells[counted::slots]))
            else:
                total = sum(cells[slot::slots])
            free = limit - total
            if free <= 0:
                return -total
            grant = amount if free - amount > margin else 1
            cells[worker * slots + slot] += grant
            self._generations[worker] += 1
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, start)
        return grant

    def unreserve(self, slot: int, worker: int, amount: int) -> None:
        """
        Take C{amount} from C{worker}'s cell of C{slot} (no lock: a single
        writer, and a smaller total only leaves more room), never below 0.
        """
        i = worker * self.slots + slot
        cells = self._cells
        cells[i] = max(0, cells[i] - amount)
        self._generations[worker] += 1

    def release(self, slot: int, worker: int) -> bool:
        """
        Count one connection of C{worker} in C{slot} less (no lock).

        @return: C{False}, and nothing changed, if C{worker}'s count there
            was already 0.
        """
        i = worker * self.slots + slot
        cells = self._cells
        n = cells[i]
        if n <= 0:
            return False
        cells[i] = n - 1
        self._generations[worker] += 1
        return True

    def total(self, slot: int, locked: bool = False) -> int:
        """
        The connections of every worker in C{slot}.

        @param locked: Read under the slot's lock, so that no acquire runs
            meanwhile: the sum is then never above the true total (releases
            may still lower it while it is read).  Without the lock the
            cells are read at slightly different moments, and the sum may
            be off either way by connections that came and went meanwhile.
        """
        if not locked:
            return sum(self._cells[slot :: self.slots])
        fd = self.fd
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1 + slot)
        try:
            return sum(self._cells[slot :: self.slots])
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 1 + slot)

    def count(self, slot: int, worker: int) -> int:
        """
        C{worker}'s own connections in C{slot}.
        """
        return self._cells[worker * self.slots + slot]

    def generation(self, worker: int) -> int:
        """
        C{worker}'s generation: it moves on every write to its row.
        """
        return self._generations[worker]

    def clearWorker(self, worker: int) -> None:
        """
        Zero C{worker}'s row, for the supervisor once that worker has exited
        and before its replacement starts (its connections died with it).
        Its generation moves on (rather than back to 0), so that no reader
        can mistake the replacement's first writes for the generation it
        last saw.
        """
        if not 0 <= worker < self.workers:
            raise IndexError(f"no worker {worker} in a table of {self.workers}")
        start = self._cellsAt + worker * self.slots * 8
        self._mm[start : start + self.slots * 8] = bytes(self.slots * 8)
        self._generations[worker] += 1

    def totals(self, ids: Iterable[str]) -> Dict[str, int]:
        """
        Backend id -> connections of every worker, for each of C{ids} (0 for
        ids no process has counted in the table); never inserts.
        """
        cells = self._cells
        slots = self.slots
        out: Dict[str, int] = {}
        for bid in ids:
            slot = self.lookup(bid)
            out[bid] = sum(cells[slot::slots]) if slot > 0 else 0
        return out


@implementer(ILoadCounter)
class SharedLoadTable(LoadTable):
    """
    A worker's L{ILoadCounter} over L{SharedCounters}: hard limits hold
    across every worker of the table; C{connections} holds totals across
    workers, exact for this worker's own connections and brought up to date
    for the others' by L{refresh}.

    The routing index reads C{connections} and drains C{changed} as it does
    a L{LoadTable}'s.  An id the shared directory has no room for (slot
    C{-1}) is counted here only, as a plain L{LoadTable} would.

    @ivar counters: The shared table.
    @ivar worker: This process's row in it.
    """

    __slots__ = (
        "_base",
        "_block",
        "_cap",
        "_cells",
        "_chunks",
        "_copies",
        "_dirty",
        "_generations",
        "_holds",
        "_ids",
        "_open",
        "_others",
        "_reserveSlot",
        "_reserved",
        "_seen",
        "_slots",
        "counters",
        "worker",
    )

    def __init__(
        self, counters: SharedCounters, worker: int, metrics: IMetricsStore | None = None
    ) -> None:
        if not 0 <= worker < counters.workers:
            raise IndexError(f"no worker {worker} in a table of {counters.workers}")
        super().__init__(metrics)
        self.counters = counters
        self.worker = worker
        self._cells = counters._cells
        self._generations = counters._generations
        self._base = worker * counters.slots
        #: Backend id -> slot (-1: counted here only).
        self._slots: Dict[str, int] = {}
        #: Slot -> backend id, for the slots of L{_slots}.
        self._ids: Dict[int, str] = {}
        #: Chunk of a row -> the slots of L{_ids} in it.
        self._chunks: Dict[int, List[int]] = {}
        #: The other workers' indexes.
        self._others: List[int] = [w for w in range(counters.workers) if w != worker]
        #: Worker -> its generation at the last refresh (None: compare all).
        self._seen: Dict[int, Optional[int]] = {w: None for w in self._others}
        #: Worker -> chunk -> the bytes of that chunk of its row at the
        #: last refresh that compared it.
        self._copies: Dict[int, Dict[int, bytes]] = {w: {} for w in self._others}
        #: Slots whose C{connections} entry was read fresh from the table
        #: (it may hold other workers' counts newer than L{_copies}): the
        #: next refresh sets them from the copies again.
        self._dirty: Set[int] = set()
        #: This worker's open connections in the global count, and the room
        #: it has reserved for them (see L{acquireGlobal}).
        self._open = 0
        self._reserved = 0
        self._reserveSlot: Optional[int] = None
        self._block = 0
        self._cap = 0
        #: Backend id -> this worker's room under its hard limit.
        self._holds: Dict[str, _Hold] = {}

    def __repr__(self) -> str:
        return (
            f"<SharedLoadTable worker={self.worker} backends={len(self.connections)} "
            f"total={sum(self.connections.values())}>"
        )

    def _register(self, backend_id: str) -> int:
        """
        Give C{backend_id} its shared slot and start following it.
        """
        slot = self.counters.slotFor(backend_id)
        self._slots[backend_id] = slot
        if slot > 0:
            self._ids[slot] = backend_id
            self._chunks.setdefault(slot // _CELLS_PER_CHUNK, []).append(slot)
            # Compare every chunk at the next refresh, and set this id
            # from the copies then: its chunk may have had no copy.
            for w in self._others:
                self._seen[w] = None
            self._dirty.add(slot)
            self._set(backend_id, sum(self._cells[slot :: self.counters.slots]))
        return slot

    def _set(self, backend_id: str, total: int) -> None:
        """
        Set C{connections[backend_id]} to C{total}, noting a change.
        """
        connections = self.connections
        if connections.get(backend_id, 0) == total:
            return
        if total > 0:
            connections[backend_id] = total
        else:
            del connections[backend_id]
        self.changed.add(backend_id)

    def track(self, backend_ids: Iterable[str]) -> None:
        """
        Give each of C{backend_ids} its shared slot now, so that
        L{refresh} brings in other workers' connections to backends this
        worker has not yet tried (e.g. every id of a new routing snapshot);
        without it an id is followed from its first L{acquire}.
        """
        slots = self._slots
        for bid in backend_ids:
            if bid not in slots:
                self._register(bid)

    def follow(self, backends: Iterable[Backend]) -> None:
        """
        L{track} every one of C{backends} (e.g. a routing snapshot's), and
        follow the hard limits they have now: room reserved under a limit
        that changed is resized at once, spare room given back, rather than
        at the backend's next acquire, so that a lowered limit holds in the
        group as soon as every worker has reloaded.
        """
        slots = self._slots
        holds = self._holds
        for b in backends:
            bid = b.id
            slot = slots.get(bid)
            if slot is None:
                slot = self._register(bid)
            hold = holds.get(bid)
            if hold is not None and hold.hard != b.hard_limit:
                if b.hard_limit > 0:
                    self._hold(bid, slot, b.hard_limit)
                else:
                    self._unhold(bid)

    def acquire(self, backend: Backend) -> bool:
        """
        See L{ILoadCounter.acquire}.

        With a hard limit, the connection is admitted from room this worker
        reserved under the limit in the backend's reservation slot: far
        from the limit up to L{HARD_BLOCK} connections' worth (at most a
        quarter of a worker's share) under one lock, near it (less than two
        blocks per worker unreserved) one connection's worth at a time.
        The reservations of every worker never add up to more than the
        limit, so neither do their connections.  On a refusal
        C{connections} gets the reserved total (at least the limit), so
        that scoring sees the backend full until the next L{refresh}.
        """
        bid = backend.id
        slot = self._slots.get(bid)
        if slot is None:
            slot = self._register(bid)
        if slot < 0:
            return LoadTable.acquire(self, backend)
        hard = backend.hard_limit
        connections = self.connections
        i = self._base + slot
        if hard > 0:
            hold = self._holds.get(bid)
            if hold is None or hold.hard != hard:
                hold = self._hold(bid, slot, hard)
            own = self._cells[i]
            if own >= hold.reserved:
                if hold.slot < 0:
                    n = self.counters.acquire(slot, self.worker, hard)
                    self._dirty.add(slot)
                    if n < 0:
                        self._set(bid, -n)
                        return False
                    connections[bid] = n
                    self.changed.add(bid)
                    return True
                grant = self.counters.reserve(
                    hold.slot, self.worker, hard, hold.block, hold.margin, slot
                )
                if grant <= 0:
                    hold.near = True
                    self._dirty.add(slot)
                    self._set(bid, -grant)
                    return False
                hold.near = grant == 1
                hold.reserved += grant
                # The lock was taken anyway: read every worker's count.
                self._cells[i] = own + 1
                self._generations[self.worker] += 1
                self._dirty.add(slot)
                connections[bid] = sum(self._cells[slot :: self.counters.slots])
                self.changed.add(bid)
                return True
        elif self._holds and bid in self._holds:
            self._unhold(bid)
        # SharedCounters.acquire without a limit, inlined; the count of
        # this worker's own connections is exact, the others' come in on
        # refresh.
        self._cells[i] += 1
        self._generations[self.worker] += 1
        connections[bid] = connections.get(bid, 0) + 1
        self.changed.add(bid)
        return True

    def _hold(self, bid: str, slot: int, hard: int) -> _Hold:
        """
        Start reserving room under C{bid}'s hard limit C{hard}, or follow a
        new limit (a reload): room for this worker's open connections is
        kept, spare room given back, and the block sized for the new limit.
        """
        counters = self.counters
        own = self._cells[self._base + slot]
        hold = self._holds.get(bid)
        if hold is None:
            # Connections opened while the backend had no limit count all
            # the same: L{SharedCounters.reserve} takes the larger of the
            # two cells.
            hold = self._holds[bid] = _Hold(counters.slotFor(reservedId(bid)))
        elif hold.slot > 0 and hold.reserved > own:
            counters.unreserve(hold.slot, self.worker, hold.reserved - own)
            hold.reserved = own
        workers = counters.workers
        hold.hard = hard
        hold.block = max(1, min(HARD_BLOCK, hard // (4 * workers)))
        hold.margin = 2 * hold.block * workers
        hold.near = True
        return hold

    def _unhold(self, bid: str) -> None:
        """
        Give back all the room reserved under C{bid}'s hard limit: it has
        none any more.
        """
        hold = self._holds.pop(bid)
        if hold.slot > 0 and hold.reserved > 0:
            self.counters.unreserve(hold.slot, self.worker, hold.reserved)

    def _spare(self, hold: _Hold, spare: int) -> None:
        """
        Give back C{spare} room under a hard limit that this worker holds
        beyond its open connections: all of it near the limit, else what
        goes past two blocks.
        """
        counters = self.counters
        slot = hold.slot
        reserved = sum(self._cells[slot :: counters.slots])
        hold.near = hold.hard - reserved < hold.margin
        if hold.near:
            give = spare
        elif spare > 2 * hold.block:
            give = spare - hold.block
        else:
            return
        counters.unreserve(slot, self.worker, give)
        hold.reserved -= give

    def release(self, backend_id: str) -> None:
        """
        See L{ILoadCounter.release}.  Releasing more than this worker took
        changes nothing, counts L{UNDERFLOW} and logs once.
        """
        slot = self._slots.get(backend_id, -1)
        if slot < 0:
            LoadTable.release(self, backend_id)
            return
        # SharedCounters.release, inlined (one call less per connection).
        cells = self._cells
        i = self._base + slot
        own = cells[i]
        if own <= 0:
            self._underflow(backend_id)
            return
        cells[i] = own - 1
        self._generations[self.worker] += 1
        if self._holds:
            hold = self._holds.get(backend_id)
            if hold is not None and hold.slot > 0:
                spare = hold.reserved - own + 1
                if spare > 0 and (hold.near or spare > 2 * hold.block):
                    self._spare(hold, spare)
        connections = self.connections
        n = connections.get(backend_id, 0)
        if n > 1:
            connections[backend_id] = n - 1
        elif n == 1:
            del connections[backend_id]
        else:  # pragma: no cover - connections counts this worker's own
            return
        self.changed.add(backend_id)

    def refresh(self) -> None:
        """
        Bring the other workers' connections into C{connections} (and the
        ids whose total moved into C{changed}); for a periodic call (every
        0.1 s or so).

        Workers whose generation has not moved since the last call are
        skipped; of the others' rows only the chunks holding slots of ids
        followed here are read, and only the slots of chunks whose bytes
        differ from the last copy are summed again.
        """
        counters = self.counters
        generations = self._generations
        mm = counters._mm
        row = counters.slots * 8
        dirty = self._dirty
        chunks = self._chunks
        copies = self._copies
        seen = self._seen
        self._sweep()
        for w in self._others:
            g = generations[w]
            if g == seen[w]:
                continue
            # The generation is read before the cells: a write after this
            # read moves it again and is seen next time.
            seen[w] = g
            copy = copies[w]
            row_at = counters._cellsAt + w * row
            for chunk, slots in chunks.items():
                at = row_at + chunk * _CHUNK
                end = min(at + _CHUNK, row_at + row)
                data = mm[at:end]
                if copy.get(chunk) != data:
                    copy[chunk] = data
                    dirty.update(slots)
        if not dirty:
            return
        cells = self._cells
        base = self._base
        ids = self._ids
        unpack = _Q.unpack_from
        others = [copies[w] for w in self._others]
        for slot in dirty:
            chunk, offset = divmod(slot * 8, _CHUNK)
            total = cells[base + slot]
            for copy in others:
                total += unpack(copy[chunk], offset)[0]
            self._set(ids[slot], total)
        dirty.clear()

    def _sweep(self) -> None:
        """
        Give back the spare room this worker holds under a limit (a hard
        limit's or the global cap) that the group's reservations have come
        near, for L{refresh}: room reserved far from the limit is otherwise
        kept until this worker next releases such a connection, and another
        worker would be refused meanwhile.
        """
        cells = self._cells
        slots = self.counters.slots
        base = self._base
        for bid, hold in self._holds.items():
            if hold.slot > 0:
                spare = hold.reserved - cells[base + self._slots[bid]]
                if spare > 0:
                    self._spare(hold, spare)
        spare = self._reserved - self._open
        slot = self._reserveSlot
        if spare > 0 and slot is not None and slot > 0:
            if self._cap - sum(cells[slot::slots]) < 2 * self._block * self.counters.workers:
                self.counters.unreserve(slot, self.worker, spare)
                self._reserved -= spare

    def acquireGlobal(self, cap: int) -> bool:
        """
        Count one more connection in the POP's global count (slot 0) if the
        group stays within C{cap} (C{cap <= 0}: no cap).

        The cap is not checked under a lock per connection (every accept of
        every worker would contend for one lock: measured, a sixth of the
        connection path with two workers).  A worker reserves room in
        blocks of L{GLOBAL_BLOCK} (at most a quarter of its share of the
        cap) in the reservation slot, under its lock, and admits from its
        own block; the reservations never add up to more than C{cap}, so
        the open connections never do either.  Near the cap (less than two
        blocks per worker left) room is reserved one connection at a time
        and given back at once, so the last connections go wherever they
        arrive; a worker keeps what it reserved farther from the cap (at
        most two blocks beyond its open connections) until it next closes a
        connection or its next L{refresh} (every 0.1 s) finds the group
        near the cap, so for that long the group may refuse up to two blocks
        per other worker short of the cap, never above it.  Hard limits
        work the same way (L{acquire}).

        @return: C{True} if counted (call L{releaseGlobal} once later).
        """
        opened = self._open
        if cap > 0 and opened >= self._reserved:
            slot = self._reserveSlot
            if slot is None:
                slot = self._reserveSlot = self.counters.slotFor(RESERVED_ID)
            if slot < 0:
                # No room in the directory (never at startup): one lock per
                # connection on the open count itself.
                if self.counters.acquire(GLOBAL_SLOT, self.worker, cap) <= 0:
                    return False
                self._open = opened + 1
                return True
            block = self._block
            if block == 0 or cap != self._cap:
                self._cap = cap
                block = self._block = max(1, min(GLOBAL_BLOCK, cap // (4 * self.counters.workers)))
            grant = self.counters.reserve(
                slot, self.worker, cap, block, 2 * block * self.counters.workers
            )
            if grant <= 0:
                return False
            self._reserved += grant
        self._open = opened + 1
        self._cells[self._base] = opened + 1
        self._generations[self.worker] += 1
        return True

    def releaseGlobal(self) -> None:
        """
        Give back a connection counted by L{acquireGlobal} (an underflow is
        counted and logged once, as for L{release}); and reserved room this
        worker no longer needs: all of it near the cap, else what goes past
        two blocks.
        """
        opened = self._open
        if opened <= 0:
            self._underflow("(global)")
            return
        opened -= 1
        self._open = opened
        self._cells[self._base] = opened
        self._generations[self.worker] += 1
        spare = self._reserved - opened
        if spare <= 0:
            return
        slot = self._reserveSlot
        if slot is None or slot < 0:
            return
        block = self._block
        counters = self.counters
        reserved = sum(self._cells[slot :: counters.slots])
        if self._cap - reserved < 2 * block * counters.workers:
            give = spare
        elif spare > 2 * block:
            give = spare - block
        else:
            return
        counters.unreserve(slot, self.worker, give)
        self._reserved -= give

    def globalTotal(self) -> int:
        """
        The POP's connections across workers in the global count.
        """
        return self.counters.total(GLOBAL_SLOT)


class SharedLoadView:
    """
    The supervisor's read-only view of L{SharedCounters}: C{connections}
    (backend id -> connections across workers, ids at 0 left out), for the
    ids given to L{track}, as of the last L{refresh}; what the metrics
    collector and the status page read as C{load.connections}.

    @ivar counters: The shared table.
    @ivar connections: Backend id -> total, replaced by each L{refresh}.
    """

    def __init__(self, counters: SharedCounters) -> None:
        self.counters = counters
        self.connections: Mapping[str, int] = {}
        self._ids: List[str] = []

    def track(self, backend_ids: Iterable[str]) -> None:
        """
        Report C{backend_ids} from the next L{refresh} on, in place of the
        ids tracked so far (e.g. every id of the routing snapshot in force).
        """
        self._ids = list(dict.fromkeys(backend_ids))

    def refresh(self) -> None:
        """
        Read the tracked ids' totals.
        """
        self.connections = {bid: n for bid, n in self.counters.totals(self._ids).items() if n > 0}

    def globalTotal(self) -> int:
        """
        The POP's connections across workers in the global count.
        """
        return self.counters.total(GLOBAL_SLOT)
