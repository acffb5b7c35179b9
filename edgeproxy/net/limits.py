"""
Per-client limits (FAULTS F19): concurrent connections and a connection
rate per client, checked on every new connection once its real client
address is known (after a PROXY header), before any backend connect.

Like HAProxy's C{stick-table type ip size 1m expire 10s store
conn_cur,conn_rate(1s)} with C{tcp-request connection reject if {
sc0_conn_cur gt N }}: one table of clients, bounded in size, where a
client holding connections is never forgotten and an idle one is
forgotten least recently used first.

The rate limit is a token bucket (C{burst} tokens, refilled at C{rate} per
second), kept as one number per client: the time at which its bucket will
be full again (the "theoretical arrival time" of the generic cell rate
algorithm, which is the same token bucket written with one variable).  It
is refilled lazily, from the clock, on each call; nothing runs per client
in the background.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edgeproxy.interfaces import IMetricsStore

__all__ = [
    "CONCURRENCY",
    "RATE",
    "REJECTED",
    "TABLE_FULL",
    "ClientLimiter",
    "LimiterStats",
]

_log = Logger()

#: Counter of connections refused by a per-client limit; the label is the
#: reason (L{CONCURRENCY}, L{RATE} or L{TABLE_FULL}).
REJECTED = "client_limit_rejected"

#: The client already holds C{max_connections} connections.
CONCURRENCY = "concurrency"

#: The client's token bucket is empty.
RATE = "rate"

#: A new client, and every tracked client holds connections: there is no
#: room to track it (see L{ClientLimiter}).
TABLE_FULL = "table-full"

_NEVER = float("-inf")

#: Slack on the rate check, in tokens: float rounding must not refuse the
#: last token of a burst (a millionth of a token is far below any clock's
#: resolution at a sane rate).
_SLACK = 1e-6


class _Client:
    """
    One tracked client.

    @ivar open: Connections it holds (always 0 when concurrency is not
        limited).
    @ivar tat: When its token bucket is full again (C{-inf}: full; unused
        when the rate is not limited), in seconds since the limiter's epoch.
    @ivar logged: When its last refusal was logged (C{-inf}: never).
    @ivar suppressed: Refusals not logged since then.
    """

    __slots__ = ("logged", "open", "suppressed", "tat")

    def __init__(self, open: int, tat: float) -> None:
        self.open = open
        self.tat = tat
        self.logged = _NEVER
        self.suppressed = 0


@attrs.frozen(slots=True)
class LimiterStats:
    """
    A snapshot of a L{ClientLimiter}'s counters.

    @ivar clients: Clients tracked now.
    @ivar busy: Of those, clients holding connections (never evicted).
    @ivar rejected: Refusals since start, by reason.
    @ivar evicted: Idle clients forgotten to make room for a new one.
    @ivar swept: Idle clients forgotten by L{ClientLimiter.sweep}.
    @ivar suppressed: Refusals not logged on a line of their own.
    @ivar underflow: Releases of a client holding no connection (a caller
        bug; the count never goes negative).
    """

    clients: int
    busy: int
    rejected: Mapping[str, int]
    evicted: int
    swept: int
    suppressed: int
    underflow: int


class ClientLimiter:
    """
    Per-client concurrency and rate limits, in a table of bounded size.

    Clients are keyed by the caller, the same way as bindings
    (L{edgeproxy.routing.bindings.client_key}: an IPv4 address, or an IPv6
    address's /64), so one host cannot escape its limits by rotating its
    privacy addresses.

    Every admitted connection costs a dict lookup or two and a few float
    operations (the clock is read only when the rate is limited); nothing
    is allocated for a client already tracked but the new bucket time (a
    float) and, when its last open connection closes, its link in the
    idle table (an C{OrderedDict} node).  Only a new client allocates an
    entry.

    Memory is bounded by C{max_clients} entries.  Clients are held in two
    tables: those holding connections (C{open > 0}), which are never
    evicted, because their counts must stay exact for their releases; and
    idle ones, in least recently used order, evicted from the oldest when a
    new client needs room.  An idle client whose bucket is full and whose
    last log line is older than C{log_interval} carries no information: it
    is dropped by L{sweep}.

    When the table is full and every tracked client holds connections, a new
    client is refused (reason L{TABLE_FULL}) rather than admitted without
    tracking: an untracked connection would escape the limits, and its
    release could not be told from a tracked one's.  Each busy client holds
    at least one connection, so with C{max_clients} at least the global
    connection cap (C{--max-connections}) this cannot happen.

    Refusals are counted (C{client_limit_rejected}, label the reason) and
    logged at most once per C{log_interval} per client (the line says how
    many refusals of that client were not logged since its last one), and at
    most C{log_lines} lines per C{log_interval} in all; L{sweep} logs how
    many refusals went unlogged since its last summary.  The per-client
    state lives in the client's entry: a client evicted under pressure
    (C{max_clients} more recently seen clients) may be logged again sooner.

    Reactor thread only.

    @ivar max_connections: Concurrent connections per client; 0 = off.
    @ivar rate: New connections per second per client; 0 = off.
    @ivar burst: Tokens in a full bucket (connections a client may open at
        once after being quiet).
    @ivar max_clients: Most clients tracked.
    @ivar log_interval: Seconds between two log lines about one client.
    @ivar log_lines: Most refusal lines logged per C{log_interval}.
    """

    __slots__ = (
        "_busy",
        "_cap",
        "_emission",
        "_empty",
        "_epoch",
        "_evicted",
        "_full_logged",
        "_full_suppressed",
        "_idle",
        "_metrics",
        "_rate",
        "_rejected",
        "_reset",
        "_seconds",
        "_summarised",
        "_suppressed",
        "_swept",
        "_tau",
        "_underflow",
        "_window",
        "_window_lines",
        "burst",
        "log_interval",
        "log_lines",
        "max_clients",
        "max_connections",
        "rate",
    )

    def __init__(
        self,
        max_connections: int = 0,
        rate: float = 0.0,
        burst: float | None = None,
        *,
        clock: IReactorTime,
        max_clients: int = 100_000,
        log_interval: float = 10.0,
        log_lines: int = 100,
        metrics: IMetricsStore | None = None,
    ) -> None:
        """
        @param max_connections: Concurrent connections per client; 0 = off.
        @param rate: New connections per second per client; 0 = off.
        @param burst: Tokens in a full bucket, at least 1; default
            C{max(1, rate)}.  Ignored when C{rate} is 0.
        @param clock: Where time comes from (the reactor).
        @param max_clients: Most clients tracked, at 160 to 240 bytes
            each, address included (C{bench/bench_limits.py}): about 24 MB
            at the default, which is ten times the default global
            connection cap, so L{TABLE_FULL} needs a configured cap above
            it.
        @param log_interval: Seconds between two log lines about one
            client.
        @param log_lines: Most refusal lines logged per C{log_interval}.
        @param metrics: Where refusals are counted, if given.
        @raise ValueError: For a negative limit or C{log_lines}, a
            non-finite rate, a C{burst} below 1 (with a rate), a
            C{max_clients} below 1 or a C{log_interval} not above 0.
        """
        if max_connections < 0:
            raise ValueError(f"max_connections must be >= 0, got {max_connections!r}")
        if not 0 <= rate < float("inf"):
            raise ValueError(f"rate must be >= 0 and finite, got {rate!r}")
        if burst is None:
            burst = max(1.0, float(rate))
        if rate and not 1 <= burst < float("inf"):
            raise ValueError(f"burst must be >= 1 and finite, got {burst!r}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients!r}")
        if not log_interval > 0:
            raise ValueError(f"log_interval must be > 0, got {log_interval!r}")
        if log_lines < 0:
            raise ValueError(f"log_lines must be >= 0, got {log_lines!r}")
        self.max_connections = max_connections
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_clients = max_clients
        self.log_interval = float(log_interval)
        self.log_lines = log_lines
        self._seconds = clock.seconds
        self._metrics = metrics
        self._cap = max_connections
        self._rate = self.rate
        # Emission interval (seconds per token) and burst tolerance: a
        # connection is refused when the bucket would be full later than
        # _tau from now, i.e. holds less than one token.
        self._emission = 1.0 / self.rate if self.rate else 0.0
        self._tau = (self.burst - 1.0 + _SLACK) * self._emission
        # A bucket full further ahead than this was filled by a clock that
        # has since been stepped back; it is then counted as just emptied.
        self._reset = self._tau + self._emission
        self._empty = self.burst * self._emission
        # Times are kept relative to the start: small floats keep full
        # precision over a long run of additions.
        self._epoch = self._seconds()
        self._busy: Dict[str, _Client] = {}
        self._idle: OrderedDict[str, _Client] = OrderedDict()
        self._rejected: Dict[str, int] = {CONCURRENCY: 0, RATE: 0, TABLE_FULL: 0}
        self._evicted = 0
        self._swept = 0
        self._suppressed = 0
        self._summarised = 0
        self._underflow = 0
        self._window = _NEVER
        self._window_lines = 0
        self._full_logged = _NEVER
        self._full_suppressed = 0

    def __repr__(self) -> str:
        return (
            f"<ClientLimiter max_connections={self.max_connections} rate={self.rate}"
            f" burst={self.burst} clients={len(self)}/{self.max_clients}>"
        )

    @property
    def enabled(self) -> bool:
        """
        Whether any limit is on (when not, L{admit} admits everything and
        tracks nothing).
        """
        return bool(self._cap or self._rate)

    def __len__(self) -> int:
        return len(self._busy) + len(self._idle)

    def connections(self, key: str) -> int:
        """
        Connections client C{key} holds, as counted (0 when concurrency is
        not limited).
        """
        entry = self._busy.get(key)
        return 0 if entry is None else entry.open

    def admit(self, key: str) -> str | None:
        """
        A new connection from client C{key}: may it go on?

        When admitted and concurrency is limited, the client's count is
        taken: the caller must call L{release} exactly once when the
        connection is over.  (Calling L{release} for every admitted
        connection is always correct: without a concurrency limit it does
        nothing.)  A refused connection takes nothing and must not be
        released.

        @param key: The client (see L{edgeproxy.routing.bindings.client_key}).
        @return: C{None} if admitted, else why not: L{CONCURRENCY},
            L{RATE} or L{TABLE_FULL}.
        """
        busy = self._busy
        entry = busy.get(key)
        if entry is None:
            # An idle client, if tracked.  With a concurrency limit it
            # leaves the idle table here (for the busy one, or back to the
            # recent end of the idle one if refused).
            entry = self._idle.pop(key, None) if self._cap else self._idle.get(key)
            if entry is None:
                return self._new(key)
        elif entry.open >= self._cap:
            return self._refuse(key, entry, CONCURRENCY, self._seconds() - self._epoch)
        if self._rate:
            now = self._seconds() - self._epoch
            tat = entry.tat
            if tat < now:
                tat = now
            if tat - now > self._tau:
                if tat - now > self._reset:
                    # The clock was stepped back: count the bucket as just
                    # emptied, not as full only once the clock catches up.
                    entry.tat = now + self._empty
                if not entry.open:
                    if self._cap:
                        self._idle[key] = entry
                    else:
                        self._idle.move_to_end(key)
                return self._refuse(key, entry, RATE, now)
            entry.tat = tat + self._emission
        if self._cap:
            n = entry.open
            if not n:
                busy[key] = entry
            entry.open = n + 1
        else:
            self._idle.move_to_end(key)
        return None

    def release(self, key: str) -> None:
        """
        A connection of client C{key} that L{admit} admitted is over.
        """
        busy = self._busy
        entry = busy.get(key)
        if entry is None:
            if self._cap:
                self._underflow += 1
            return
        n = entry.open - 1
        entry.open = n
        if not n:
            del busy[key]
            self._idle[key] = entry

    def _new(self, key: str) -> str | None:
        """
        L{admit} for a client not tracked: track it, making room if needed.
        """
        cap = self._cap
        rate = self._rate
        if not (cap or rate):
            return None
        idle = self._idle
        busy = self._busy
        if len(busy) + len(idle) >= self.max_clients:
            if not idle:
                return self._tableFull(key)
            idle.popitem(last=False)
            self._evicted += 1
        if rate:
            # A full bucket, less the token this connection takes.
            entry = _Client(0, self._seconds() - self._epoch + self._emission)
        else:
            entry = _Client(0, _NEVER)
        if cap:
            entry.open = 1
            busy[key] = entry
        else:
            idle[key] = entry
        return None

    def _refuse(self, key: str, entry: _Client, reason: str, now: float) -> str:
        """
        Count a refusal of C{key}, and log it unless this client was logged
        less than C{log_interval} ago or this interval's lines are spent.
        """
        self._rejected[reason] += 1
        metrics = self._metrics
        if metrics is not None:
            metrics.increment(REJECTED, reason)
        if now - entry.logged >= self.log_interval and self._lineAllowed(now):
            if reason == CONCURRENCY:
                _log.warn(
                    "client {client} refused: it holds {limit} connections"
                    " (--client-max-connections); {suppressed} more refusals of it"
                    " not logged since its last line",
                    client=key,
                    reason=reason,
                    limit=self.max_connections,
                    suppressed=entry.suppressed,
                )
            else:
                _log.warn(
                    "client {client} refused: over {rate} new connections per second"
                    " (burst {burst}; --client-rate, --client-burst); {suppressed} more"
                    " refusals of it not logged since its last line",
                    client=key,
                    reason=reason,
                    rate=self.rate,
                    burst=self.burst,
                    suppressed=entry.suppressed,
                )
            entry.logged = now
            entry.suppressed = 0
        else:
            entry.suppressed += 1
            self._suppressed += 1
        return reason

    def _tableFull(self, key: str) -> str:
        """
        Refuse a new client for want of room; logged at most once per
        C{log_interval}.
        """
        self._rejected[TABLE_FULL] += 1
        metrics = self._metrics
        if metrics is not None:
            metrics.increment(REJECTED, TABLE_FULL)
        now = self._seconds() - self._epoch
        if now - self._full_logged >= self.log_interval:
            _log.warn(
                "client {client} refused: {clients} clients tracked, each holding"
                " connections; {suppressed} more refused for the same reason since"
                " the last line (raise the client table size to at least"
                " --max-connections)",
                client=key,
                reason=TABLE_FULL,
                clients=self.max_clients,
                suppressed=self._full_suppressed,
            )
            self._full_logged = now
            self._full_suppressed = 0
        else:
            self._full_suppressed += 1
            self._suppressed += 1
        return TABLE_FULL

    def _lineAllowed(self, now: float) -> bool:
        """
        Take one of this interval's C{log_lines}, if any is left.
        """
        if now - self._window >= self.log_interval:
            self._window = now
            self._window_lines = 0
        if self._window_lines >= self.log_lines:
            return False
        self._window_lines += 1
        return True

    def sweep(self) -> int:
        """
        Forget idle clients that carry no information: a full bucket and no
        log line within C{log_interval}.  Meant for a C{TimerService}; never
        raises.

        Walks the idle clients from the least recently used and stops at the
        first one to keep, so its cost is what it frees, plus one.  (A
        client is kept at most C{max(burst / rate, log_interval)} after it
        was last seen, so one kept does not hold back much older ones for
        long.)  Also logs how many refusals went unlogged since the last
        sweep, if any.

        @return: How many clients were forgotten.
        """
        now = self._seconds() - self._epoch
        horizon = now - self.log_interval
        idle = self._idle
        freed = 0
        while idle:
            key = next(iter(idle))
            entry = idle[key]
            if entry.tat > now or entry.logged > horizon:
                break
            del idle[key]
            freed += 1
        self._swept += freed
        unlogged = self._suppressed - self._summarised
        if unlogged:
            self._summarised = self._suppressed
            _log.info(
                "per-client limits: {unlogged} refusals not logged on a line of their own"
                " since the last summary ({total} in all)",
                unlogged=unlogged,
                total=self._suppressed,
            )
        return freed

    def stats(self) -> LimiterStats:
        """
        The limiter's counters now.
        """
        return LimiterStats(
            clients=len(self),
            busy=len(self._busy),
            rejected=dict(self._rejected),
            evicted=self._evicted,
            swept=self._swept,
            suppressed=self._suppressed,
            underflow=self._underflow,
        )

    def _check_invariants(self) -> None:
        """
        For tests: the table is within bounds, busy clients hold
        connections, idle ones none.
        """
        if len(self) > self.max_clients:
            raise AssertionError(f"{len(self)} clients > max_clients {self.max_clients}")
        for key, entry in self._busy.items():
            if entry.open < 1:
                raise AssertionError(f"busy client {key!r} holds {entry.open}")
            if key in self._idle:
                raise AssertionError(f"client {key!r} both busy and idle")
        for key, entry in self._idle.items():
            if entry.open:
                raise AssertionError(f"idle client {key!r} holds {entry.open}")
