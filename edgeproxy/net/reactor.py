# -*- test-case-name: tests.test_reactor -*-
"""
C{edgeepoll}: Twisted's epoll reactor without the legacy log context.

Twisted's L{EPollReactor.doPoll} runs every read/write event through
C{twisted.python.log.callWithLogger}, which asks the selectable for its
C{logPrefix()} and pushes a legacy log context around the call -- about a
tenth of the proxy's CPU.  L{EdgeEPollReactor} dispatches directly.  An
exception from C{doRead}/C{doWrite} (that is, from a protocol) is still
caught: it is logged through C{twisted.logger}, with the selectable and its
log prefix as fields, and that one connection is dropped, exactly as
Twisted's C{_doReadOrWrite} does; the reactor carries on.

Events emitted with C{twisted.logger} carry no legacy C{system} context
anyway; only C{twisted.python.log.msg} calls made inside C{doRead} lose the
selectable's log prefix as their system.

Use it as C{twistd --reactor=edgeepoll edgeproxy ...} (the plugin is in
C{twisted/plugins/edgeproxy_reactor.py}) or call L{install} before anything
imports C{twisted.internet.reactor}.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["EdgeEPollReactor", "install"]

_log = Logger()


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"


class EdgeEPollReactor(EPollReactor):
    """
    An epoll reactor whose poll loop dispatches I/O events without
    C{log.callWithLogger}.
    """

    def doPoll(self, timeout: float | None) -> None:
        """
        Poll for I/O events and dispatch them.
        """
        if timeout is None:
            timeout = -1  # wait indefinitely
        selectables = self._selectables
        try:
            events = self._poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # _doReadOrWrite catches the protocol's errors itself; this
                # is what callWithLogger guarded: an error while
                # disconnecting.  Log it and keep the loop going.
                _log.failure(
                    "unhandled error dispatching an I/O event to {selectable} ({prefix})",
                    selectable=selectable,
                    prefix=_prefix(selectable),
                )

    doIteration = doPoll

    def _doReadOrWrite(self, selectable: Any, fd: int, event: int) -> None:
        """
        Twisted's C{_PollLikeMixin._doReadOrWrite}, logging an exception
        with C{twisted.logger} (the selectable as a field) instead of
        C{log.err} in the legacy context.
        """
        why: Any = None
        in_read = False
        if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):
            # Disconnected, and every pending input was read.
            if fd in self._reads:
                # Reading: a clean shutdown (or a half-close).
                in_read = True
                why = CONNECTION_DONE
            else:
                why = CONNECTION_LOST
        else:
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    if event & self._POLL_IN:
                        why = selectable.doRead()
                        in_read = True
                    if not why and event & self._POLL_OUT:
                        why = selectable.doWrite()
                        in_read = False
            except BaseException as e:
                # Any exception from application code is logged and
                # disconnects that selectable.
                why = e
                _log.failure(
                    "unhandled error in {selectable} ({prefix}); dropping it",
                    failure=Failure(),
                    selectable=selectable,
                    prefix=_prefix(selectable),
                )
        if why:
            self._disconnectSelectable(selectable, why, in_read)


def install() -> EdgeEPollReactor:
    """
    Install L{EdgeEPollReactor} as the global reactor.
    """
    reactor = EdgeEPollReactor()
    from twisted.internet.main import installReactor

    installReactor(reactor)
    return reactor
