"""
Run C{python -m twisted ...} with experimental knobs applied first.

Used by C{bench/run.py --variant} to measure the effect of settings that
have no command-line option (yet), without editing edgeproxy.  Each knob is
an environment variable; unset means "as shipped":

  - C{EDGEPROXY_BENCH_BUFSIZE=N}: read size of every TCP transport
    (C{twisted.internet.tcp.Connection.bufferSize}, default 65536).
  - C{EDGEPROXY_BENCH_READ_SIZE=N}: edgeproxy's read size and pause
    threshold on plain TCP legs (C{edgeproxy.net.proxy.READ_SIZE}).
  - C{EDGEPROXY_BENCH_SOCKBUF=N}: SO_RCVBUF/SO_SNDBUF set on every TCP
    transport when it is created.
  - C{EDGEPROXY_BENCH_NO_CONN_LOG=1}: drop the per-connection log event at
    its source (C{edgeproxy.net.proxy}'s logger emits nothing), to measure what
    the log line costs.  Measurement only: the shipped proxy always logs.
  - C{EDGEPROXY_BENCH_EAGER_WRITE=1}: C{transport.write} tries
    C{socket.send} at once when nothing is queued (Twisted otherwise always
    queues, registers the writer with epoll and sends on the next loop
    iteration); a partial send queues the rest as usual.
  - C{EDGEPROXY_BENCH_FAST_LOG_CONTEXT=1}: the reactor calls C{doRead} /
    C{doWrite} without the legacy C{callWithLogger} log-context wrapper
    (exceptions are still caught and logged).
  - C{EDGEPROXY_BENCH_NO_EXIT_SIGNAL=1}: after SIGTERM, return from
    C{main} instead of re-raising the signal, so that an in-process
    profiler (pyinstrument) gets to write its report.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any


def _apply() -> None:
    from twisted.internet import tcp

    bufsize = os.environ.get("EDGEPROXY_BENCH_BUFSIZE")
    if bufsize:
        tcp.Connection.bufferSize = int(bufsize)

    read_size = os.environ.get("EDGEPROXY_BENCH_READ_SIZE")
    if read_size:
        import edgeproxy.net.proxy as proxy_module

        proxy_module.READ_SIZE = int(read_size)

    sockbuf = os.environ.get("EDGEPROXY_BENCH_SOCKBUF")
    if sockbuf:
        size = int(sockbuf)
        original = tcp.Connection.__init__

        def patched(self: Any, skt: socket.socket, *a: Any, **kw: Any) -> None:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            original(self, skt, *a, **kw)

        tcp.Connection.__init__ = patched  # type: ignore[method-assign]

    if os.environ.get("EDGEPROXY_BENCH_EAGER_WRITE"):
        from twisted.internet import abstract

        queued_write = abstract.FileDescriptor.write

        def eager_write(self: Any, data: bytes) -> None:
            if (
                data
                and self.connected
                and not self._tempDataLen
                and self.offset == len(self.dataBuffer)
                and not self.disconnecting
                and not self._writeDisconnecting
                and not self._writeDisconnected
                and type(data) is bytes
            ):
                sock = getattr(self, "socket", None)
                if sock is not None:
                    try:
                        sent = sock.send(data)
                    except OSError:
                        sent = 0  # EAGAIN, or an error doWrite will report
                    if sent == len(data):
                        return
                    if sent:
                        data = data[sent:]
            queued_write(self, data)

        abstract.FileDescriptor.write = eager_write  # type: ignore[method-assign]

    if os.environ.get("EDGEPROXY_BENCH_FAST_LOG_CONTEXT"):
        from twisted.python import log as legacy_log

        def call_without_context(logger: Any, func: Any, *args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except KeyboardInterrupt:
                raise
            except BaseException:
                legacy_log.err(system="reactor")
                return None

        legacy_log.callWithLogger = call_without_context

    if os.environ.get("EDGEPROXY_BENCH_NO_EXIT_SIGNAL"):
        from twisted.application.twist import _twist

        _twist._exitWithSignal = lambda sig: None  # type: ignore[attr-defined]

    if os.environ.get("EDGEPROXY_BENCH_NO_CONN_LOG"):
        from twisted.logger import Logger

        import edgeproxy.net.proxy as proxy_module

        class _Silent(Logger):
            def emit(self, level: Any, format: Any = None, **kwargs: Any) -> None:
                return None

        for name in dir(proxy_module):
            if isinstance(getattr(proxy_module, name), Logger):
                setattr(proxy_module, name, _Silent(namespace="edgeproxy.net.proxy"))


if __name__ == "__main__":
    _apply()
    from twisted.application.twist._twist import Twist

    sys.argv[0] = "twist"
    sys.exit(Twist.main())
