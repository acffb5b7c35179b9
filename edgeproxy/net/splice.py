# -*- test-case-name: tests.test_splice -*-
"""
Zero-copy relaying between two lean TCP transports: C{splice(2)} through a
pipe, on Linux.

Once a proxied connection is carried by two L{edgeproxy.net.lean}
transports (plain TCP on both legs) and one read of a direction brought
L{BULK_READ} bytes or more (a bulk stream: its socket fills faster than the
proxy reads it), the reading transport's C{doRead} stops copying bytes
through Python: it splices what its socket holds into a pipe, and the pipe
into the other socket, with C{SPLICE_F_MOVE | SPLICE_F_NONBLOCK}.  A splice
that moves less than L{SMALL_SPLICE} goes back to copying until the next
large read.  Short connections never pay for the pipe, and small messages
on a long connection (keepalive requests) are not spliced: two splices
cost more than a C{recv} and a C{send} for a few hundred bytes.

The pipe belongs to the transport the bytes go to (the "out" transport):
it is the first part of its write buffer.  The rules that keep Twisted's
own buffering, backpressure and close paths intact:

  - A read splices only when the out transport has nothing buffered
    (Twisted's buffer and the pipe both empty) and is open for writing;
    otherwise it is an ordinary C{recv} and C{dataReceived}, so bytes never
    overtake each other.
  - When the out socket is full (C{EAGAIN}) with bytes left in the pipe,
    the reader stops reading and the out transport waits for writability;
    its C{doWrite} drains the pipe first, then resumes the reader and goes
    on with Twisted's C{doWrite} (the rest of its buffer, a pending close or
    half-close).  What one direction holds is thus bounded by the pipe
    (L{PIPE_SIZE}) on top of the kernel's socket buffers.
  - A splice that reads 0 bytes is the peer's FIN (C{CONNECTION_DONE},
    which the reactor turns into C{readConnectionLost}); a socket error is
    C{CONNECTION_LOST}, as C{tcp.Connection.doRead} returns; an error on the
    out socket is left to the out transport's own C{doWrite} to meet and
    report.
  - C{EINVAL}/C{ENOSYS} (a kernel or socket that cannot splice) switches
    that connection back to ordinary reads for good; whatever was in the
    pipe is handed to Twisted's write buffer first.
  - The byte counters of the session count spliced bytes
    (C{protocol.splicedReceived(n)}), so the idle timeout, the metrics and
    the access log see them.

Pipes cost two descriptors each: a direction engaging is given a limit
(L{engage}), and a pipe is made only while fewer than that many are open in
the process (L{edgeproxy.tap} reserves descriptors for L{PIPE_LIMIT}).  A
connection that finds none free carries on copying and tries again at its
next large read.  A pipe the kernel made smaller than
L{MIN_PIPE} (a user over C{fs.pipe-user-pages-soft}) is not worth its
system calls and is closed again.

Without C{os.splice} (not Linux, Python before 3.10, PyPy 3.9) L{AVAILABLE}
is false and nothing here is used.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from typing import Any

from twisted.internet import main, tcp

__all__ = [
    "AVAILABLE",
    "BULK_READ",
    "MIN_PIPE",
    "PIPE_LIMIT",
    "PIPE_SIZE",
    "SMALL_SPLICE",
    "close_pipe",
    "drain",
    "engage",
    "pipes_open",
    "read",
]

_splice: Any = getattr(os, "splice", None)

#: Whether this Python and platform can splice at all.
AVAILABLE = _splice is not None and sys.platform.startswith("linux")

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

#: An ordinary read this large switches its direction to splicing (and
#: makes its pipe, the first time).
BULK_READ = 64 * 1024

#: A splice that moved less than this switches its direction back to
#: ordinary reads (until the next L{BULK_READ}).
SMALL_SPLICE = 16 * 1024

#: The smallest pipe worth splicing through (bytes).
MIN_PIPE = 64 * 1024

#: The size asked for each pipe (bytes): in bench/run.py's one-stream bulk
#: 256 KiB moved a third more bytes per CPU-second than the default 64 KiB
#: (1 MiB no more).  Where the kernel refuses (a user past
#: C{fs.pipe-user-pages-soft}) the pipe keeps its size.  It is also what one
#: direction can hold in the proxy, as Twisted's buffer would (twice
#: L{edgeproxy.net.proxy.READ_SIZE}).
PIPE_SIZE = 256 * 1024

#: Bytes asked of one splice (the pipe's capacity bounds what it moves).
_CHUNK = 1 << 20

#: Errors meaning "this kernel or socket cannot splice": ordinary reads for
#: good on that connection.
_UNSUPPORTED = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))

_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: The default limit on pipes open at a time (two descriptors each),
#: process-wide.  1024 pipes of the kernel's default 64 KiB are its default
#: C{fs.pipe-user-pages-soft} (64 MiB per user), past which it gives new
#: pipes two pages only (and refuses to grow them).
PIPE_LIMIT = 1024

_open = [0]


def pipes_open() -> int:
    """
    Pipes open now (all connections).
    """
    return _open[0]


def _openPipe(out: Any, limit: int) -> int:
    """
    Give C{out} its pipe; its write end, or -1 if there is none to have
    (C{limit} reached, out of descriptors, a pipe too small).
    """
    if _open[0] >= limit:
        return -1
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        size = fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        try:
            size = fcntl.fcntl(w, _F_GETPIPE_SZ)
        except OSError:
            size = MIN_PIPE
    if size < MIN_PIPE:
        os.close(r)
        os.close(w)
        return -1
    _open[0] += 1
    out._pipeR = r
    out._pipeW = w
    return w


def close_pipe(transport: Any) -> None:
    """
    Close C{transport}'s pipe (whatever it still holds is dropped: the
    transport is gone).
    """
    r, w = transport._pipeR, transport._pipeW
    if w < 0:
        return
    transport._pipeR = transport._pipeW = -1
    transport._pipeLen = 0
    _open[0] -= 1
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def engage(reader: Any, out: Any, limit: int) -> bool:
    """
    A read of L{BULK_READ} bytes or more came from C{reader}, whose bytes
    go to C{out} (the other leg of the connection): if both are lean
    transports, splicing is available and C{limit} (the pipes the process
    may have open) is positive, C{reader}'s next reads splice (its
    C{doRead} becomes L{read} until a small splice, or a missing pipe,
    makes it copy again).  C{False} if nothing changed.

    Called by the session's C{dataReceived} for large reads only: a
    connection that never carries a bulk stream has no attribute set and
    no extra call per read (an idle connection costs no memory for this).
    """
    if (
        limit <= 0
        or not AVAILABLE
        or not getattr(reader, "_splices", False)
        or not getattr(out, "_splices", False)
        or reader._pipeLimit < 0  # (refused by the kernel: copy for good)
        or "doRead" in reader.__dict__
    ):
        return False
    reader._spliceOut = out
    reader._pipeLimit = limit
    reader.doRead = lambda: read(reader, out)
    return True


def _copy(reader: Any) -> None:
    """
    C{reader} goes back to ordinary reads (its class's C{doRead}).
    """
    reader.__dict__.pop("doRead", None)


def read(reader: Any, out: Any) -> Any:
    """
    C{doRead} of a lean transport splicing to C{out} (see L{engage}).
    """
    if out._pipeLen:
        # Waiting for the pipe to drain (a spurious wake-up).
        reader.stopReading()
        out._pipeWaiter = reader
        return None
    if (
        out._tempDataLen
        or out.offset != len(out.dataBuffer)
        or not out.connected
        or out.disconnecting
        or out._writeDisconnecting
    ):
        # Something is queued (or the out side is closing): keep Twisted's
        # order and paths.
        return tcp.Connection.doRead(reader)
    w = out._pipeW
    if w < 0:
        w = _openPipe(out, reader._pipeLimit)
        if w < 0:
            # No pipe to have now: copy, and ask again at a large read.
            _copy(reader)
            return tcp.Connection.doRead(reader)
    try:
        n = _splice(reader.socket.fileno(), w, _CHUNK, flags=_FLAGS)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            reader._spliceOut = None
            reader._pipeLimit = -1
            _copy(reader)
            return tcp.Connection.doRead(reader)
        return main.CONNECTION_LOST
    if not n:
        # The peer's FIN; this direction needs no pipe any more.
        close_pipe(out)
        return main.CONNECTION_DONE
    reader.splicedBytes += n
    reader.protocol.splicedReceived(n)
    out._pipeLen = n
    if n < SMALL_SPLICE:
        # The stream slowed down to small messages: copy them.
        _copy(reader)
    if _push(out, reader):
        # The out socket is full (or failed): wait for it, reading nothing
        # more meanwhile (the pipe is the buffer).
        reader.stopReading()
        out._pipeWaiter = reader
        out.startWriting()
    return None


def _emptyPipe(out: Any) -> OSError | None:
    """
    Splice C{out}'s pipe into its socket as far as it goes (until it is
    empty or the socket is full); C{out._pipeLen} is what is left.  The
    error that stopped it, if any other than C{EAGAIN}.
    """
    left = out._pipeLen
    r = out._pipeR
    fd = out.socket.fileno()
    err = None
    try:
        while left:
            m = _splice(r, fd, left, flags=_FLAGS)
            if not m:
                break
            left -= m
    except BlockingIOError:
        pass
    except OSError as e:
        err = e
    out._pipeLen = left
    return err


def _push(out: Any, reader: Any) -> bool:
    """
    Splice C{out}'s pipe into its socket as far as it goes; C{True} if
    bytes are left (C{EAGAIN}, or an error its C{doWrite} will meet).
    """
    err = _emptyPipe(out)
    if err is not None and err.errno in _UNSUPPORTED:
        _unpipe(out, reader)
        return False
    return bool(out._pipeLen)


def _unpipe(out: Any, reader: Any) -> None:
    """
    Splicing out failed as unsupported: move what the pipe holds to
    C{out}'s write buffer (it is empty: the pipe is only filled then) and
    read ordinarily from now on.
    """
    reader._spliceOut = None
    reader._pipeLimit = -1
    _copy(reader)
    chunks = []
    left = out._pipeLen
    while left:
        try:
            data = os.read(out._pipeR, left)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    out._pipeLen = 0
    close_pipe(out)
    for data in chunks:
        out.write(data)


def drain(out: Any) -> Any:
    """
    The first part of C{doWrite} of a transport with bytes in its pipe:
    drain it, then resume the reader waiting for that.

    @return: C{None} if the pipe is still not empty (keep waiting), an
        error to end the connection with, or C{True} once it is empty
        (the caller goes on with Twisted's C{doWrite}, or stops writing if
        nothing else is left).
    """
    err = _emptyPipe(out)
    if err is not None:
        if err.errno in _UNSUPPORTED:
            waiter = out._pipeWaiter
            out._pipeWaiter = None
            if waiter is not None:
                _unpipe(out, waiter)
                _resume(waiter)
            return True
        return main.CONNECTION_LOST
    if out._pipeLen:
        return None
    waiter = out._pipeWaiter
    if waiter is not None:
        out._pipeWaiter = None
        _resume(waiter)
    return True


def _resume(reader: Any) -> None:
    if reader.connected and not reader.disconnecting:
        reader.startReading()
