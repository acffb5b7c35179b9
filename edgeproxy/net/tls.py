"""
TLS termination with SNI certificates: the C{txsni:CERTDIR:REST} listener.

L{sni_server_endpoint} wraps any stream server endpoint (C{tcp:8443}, or a
PROXY-header endpoint so that a trusted load balancer's header precedes the
handshake) so that every accepted connection is TLS, with the certificate
chosen by the client's SNI name from a directory of PEM files:

    CERTDIR/DEFAULT.pem           clients without SNI or with an unknown name
    CERTDIR/<name>.pem            e.g. C{www.example.com.pem}: key + chain
    CERTDIR/*.<domain>.pem        (or C{_.<domain>.pem}) one-label wildcard

Behaviour, and why:

  - The application factory (the proxy) sees nothing of a connection until
    its handshake has completed: L{TLSMemoryBIOProtocol} would connect the
    wrapped protocol at accept time, so the wrapped protocol is a
    L{_HandshakeGate} that only builds and connects the real protocol on
    C{handshakeCompleted}.  Random bytes, plain HTTP, truncated hellos, old
    protocol versions and stalled handshakes therefore never cause a backend
    connect; each is logged in one line (no traceback) and counted as
    C{tls_handshake_failed} with a short reason.
  - The handshake timeout is one timer started at accept and cancelled only
    by a completed handshake: data does not reset it, so a client sending a
    byte a second is cut off on time.
  - TLS 1.2 is the floor; renegotiation is disabled (C{OP_NO_RENEGOTIATION});
    no ALPN is offered (L4).
  - Certificates are loaded once into cached contexts; the SNI callback is
    a dict lookup.  A rescan every C{rescan_interval} seconds (stat only;
    changed files are read and parsed in a thread) picks up added, replaced
    and removed files.  A broken file is refused with one log line per change
    of the file; if an earlier version of the same file was valid, that
    version stays in service (last good state).  A removed file stops being
    served (its clients get the default), except C{DEFAULT.pem}, whose last
    good version stays.  A missing or broken C{DEFAULT.pem} at startup is a
    L{CertificateDirectoryError}.
  - Half-close through TLS: a client's C{close_notify} (or a bare FIN) is
    delivered to a half-closeable application as C{readConnectionLost}, and
    the application may keep writing; the application's
    C{loseWriteConnection} sends our C{close_notify} followed by a TCP FIN
    and keeps reading.  C{loseConnection} sends C{close_notify} and closes
    without waiting for the peer's reply (as an L4 terminator should).
    Producers work as on TCP; C{loseConnection} unregisters a producer still
    registered instead of waiting for it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any, Callable, Union, cast

import attrs
from OpenSSL.SSL import (
    OP_NO_RENEGOTIATION,
    Connection,
    Error,
    SysCallError,
    WantReadError,
    ZeroReturnError,
)
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from txsni.only_noticed_pypi_pem_after_i_wrote_this import objectsFromPEM
from txsni.snimap import SNIMap
from zope.interface import implementer

from edgeproxy.interfaces import IMetricsStore
from edgeproxy.net.admission import Admission, release_admission

__all__ = [
    "DEFAULT_NAME",
    "CertificateDirectoryError",
    "CertificateStore",
    "SNIServerEndpoint",
    "load_pem",
    "sni_server_endpoint",
]

_log = Logger()

DEFAULT_NAME = "DEFAULT"
_DEFAULT_FILE = DEFAULT_NAME + ".pem"
_MAX_PEM_SIZE = 1 << 20

_Signature = tuple[int, int, int]
_DONE = Failure(ConnectionDone())


class CertificateDirectoryError(Exception):
    """
    The certificate directory cannot be used (missing, no usable
    C{DEFAULT.pem}).
    """


def _name_for_file(filename: str) -> str | None:
    """
    The SNI key a certificate file serves: lower-case host name, C{*.domain}
    for C{*.domain.pem} / C{_.domain.pem}, L{DEFAULT_NAME} for the default;
    C{None} for files that are not certificates.
    """
    if not filename.endswith(".pem") or filename.startswith("."):
        return None
    stem = filename[:-4]
    if stem == DEFAULT_NAME:
        return DEFAULT_NAME
    stem = stem.lower().rstrip(".")
    if stem.startswith("_."):
        stem = "*" + stem[1:]
    if not stem or stem == "*.":
        return None
    return stem


def load_pem(data: bytes) -> CertificateOptions:
    """
    Parse one PEM file (one private key, its certificate, optional chain)
    into server options with a ready, cached context: TLS 1.2 minimum, no
    renegotiation.

    @raise ValueError: With a short human reason when the file is unusable.
    """
    try:
        objects = objectsFromPEM(data)
    except Exception as e:
        raise ValueError(f"unparseable PEM ({e.__class__.__name__})") from None
    if len(objects.keys) != 1:
        raise ValueError(f"expected 1 private key, found {len(objects.keys)}")
    if not objects.certificates:
        raise ValueError("no certificate")
    key = objects.keys[0]
    key_hash = key.keyHash()
    leaf = None
    chain = []
    for certificate in objects.certificates:
        if leaf is None and certificate.getPublicKey().keyHash() == key_hash:
            leaf = certificate.original.to_cryptography()
        else:
            chain.append(certificate.original.to_cryptography())
    if leaf is None:
        raise ValueError("no certificate matches the private key")
    try:
        options = CertificateOptions(
            privateKey=key.original.to_cryptography_key(),
            certificate=leaf,
            extraCertChain=chain,
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        context = options.getContext()
        context.set_options(OP_NO_RENEGOTIATION)
    except Exception as e:
        raise ValueError(f"unusable key or certificate ({e.__class__.__name__})") from None
    return options


def _read_pem(path: str) -> CertificateOptions:
    with open(path, "rb") as f:
        data = f.read(_MAX_PEM_SIZE + 1)
    if len(data) > _MAX_PEM_SIZE:
        raise ValueError(f"larger than {_MAX_PEM_SIZE} bytes")
    return load_pem(data)


@attrs.frozen
class _ScanResult:
    loaded: dict[str, tuple[_Signature, CertificateOptions]]
    broken: dict[str, tuple[_Signature, str]]
    removed: frozenset[str]
    error: str | None = None


def _scan(certdir: str, known: Mapping[str, _Signature]) -> _ScanResult:
    """
    Compare the directory with C{known} (file name -> (mtime_ns, size,
    inode)) and load what is new or changed.  Blocking: run in a thread
    (or before the reactor runs).
    """
    loaded: dict[str, tuple[_Signature, CertificateOptions]] = {}
    broken: dict[str, tuple[_Signature, str]] = {}
    seen: set[str] = set()
    try:
        entries = list(os.scandir(certdir))
    except OSError as e:
        return _ScanResult({}, {}, frozenset(), e.strerror or str(e))
    for entry in entries:
        if _name_for_file(entry.name) is None:
            continue
        try:
            st = entry.stat()
            if not entry.is_file():
                continue
        except OSError:
            continue
        seen.add(entry.name)
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if known.get(entry.name) == signature:
            continue
        try:
            loaded[entry.name] = (signature, _read_pem(entry.path))
        except ValueError as e:
            broken[entry.name] = (signature, str(e))
        except OSError as e:
            if e.errno == errno.ENOENT:
                seen.discard(entry.name)
                continue
            broken[entry.name] = (signature, e.strerror or str(e))
    return _ScanResult(loaded, broken, frozenset(known.keys() - seen))


class CertificateStore:
    """
    The certificates of one directory, by SNI name, with a periodic rescan.

    It is the mapping given to txsni's L{SNIMap}: C{store[servername]}
    (bytes, text or C{None}) always returns options with a cached context,
    falling back to the default certificate.

    The constructor reads the directory synchronously (call it before the
    reactor runs, like any configuration loading); rescans read changed files
    in the reactor's thread pool.

    @ivar sniMap: The txsni connection creator serving this store.
    """

    def __init__(self, certdir: str, reactor: Any, rescan_interval: float = 2.0) -> None:
        self.certdir = certdir
        self._reactor = reactor
        self._interval = rescan_interval
        self._signatures: dict[str, _Signature] = {}
        self._good: dict[str, CertificateOptions] = {}
        self._byName: dict[str, CertificateOptions] = {}
        self._scanning: Deferred[None] | None = None
        self._users = 0
        self._loop: LoopingCall | None = None
        self._dirError: str | None = None

        result = _scan(certdir, {})
        if result.error is not None:
            raise CertificateDirectoryError(f"certificate directory {certdir!r}: {result.error}")
        if _DEFAULT_FILE in result.broken:
            reason = result.broken[_DEFAULT_FILE][1]
            raise CertificateDirectoryError(
                f"{os.path.join(certdir, _DEFAULT_FILE)}: {reason}",
            )
        if _DEFAULT_FILE not in result.loaded:
            raise CertificateDirectoryError(
                f"{os.path.join(certdir, _DEFAULT_FILE)} is missing: it is the certificate "
                "for clients without SNI or with an unknown name",
            )
        self._default: CertificateOptions = result.loaded[_DEFAULT_FILE][1]
        self._apply(result)
        self.sniMap = _SNIMap(self)

    # -- lookups (reactor thread, per handshake) ------------------------------

    def __getitem__(self, name: Union[bytes, str, None]) -> CertificateOptions:
        """
        The options for an SNI name; the default for C{None}, L{DEFAULT_NAME},
        an unknown name or a name that is not ASCII.  Never raises.
        """
        if name is None:
            return self._default
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        key = name.lower()
        by_name = self._byName
        options = by_name.get(key)
        if options is not None:
            return options
        if key.endswith("."):
            key = key.rstrip(".")
            options = by_name.get(key)
            if options is not None:
                return options
        dot = key.find(".")
        if dot > 0:
            options = by_name.get("*" + key[dot:])
            if options is not None:
                return options
        return self._default

    def names(self) -> frozenset[str]:
        """
        The names served now (not counting the default).
        """
        return frozenset(self._byName)

    # -- reloading -------------------------------------------------------------

    def _apply(self, result: _ScanResult) -> None:
        """
        Take a scan's outcome into use (reactor thread).
        """
        if result.error is not None:
            if result.error != self._dirError:
                self._dirError = result.error
                _log.warn(
                    "Cannot read certificate directory {certdir}: {reason}; "
                    "keeping the certificates loaded before",
                    certdir=self.certdir,
                    reason=result.error,
                )
            return
        self._dirError = None
        changed = False
        for filename, (signature, options) in result.loaded.items():
            self._signatures[filename] = signature
            self._good[filename] = options
            changed = True
            _log.info(
                "Loaded certificate {file} from {certdir}",
                file=filename,
                certdir=self.certdir,
            )
        for filename, (signature, reason) in result.broken.items():
            self._signatures[filename] = signature
            _log.warn(
                "Refused certificate {file} in {certdir}: {reason}; {outcome}",
                file=filename,
                certdir=self.certdir,
                reason=reason,
                outcome=(
                    "keeping its previous version"
                    if filename in self._good
                    else "its name gets the default certificate"
                ),
            )
        for filename in result.removed:
            self._signatures.pop(filename, None)
            if filename == _DEFAULT_FILE:
                _log.warn(
                    "{file} was removed from {certdir}; keeping the last default certificate",
                    file=filename,
                    certdir=self.certdir,
                )
                continue
            if self._good.pop(filename, None) is not None:
                changed = True
                _log.info(
                    "Certificate {file} removed from {certdir}",
                    file=filename,
                    certdir=self.certdir,
                )
        if changed:
            by_name: dict[str, CertificateOptions] = {}
            for filename, options in self._good.items():
                name = _name_for_file(filename)
                if name == DEFAULT_NAME:
                    self._default = options
                elif name is not None:
                    by_name[name] = options
            self._byName = by_name

    def rescan(self) -> Deferred[None]:
        """
        Scan the directory once (reading changed files in a thread) and take
        the outcome into use.  Never fails: errors are logged and the current
        certificates stay.
        """
        if self._scanning is not None:
            return self._scanning
        known = dict(self._signatures)
        d: Deferred[Any] = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _scan, self.certdir, known
        )
        d.addCallback(self._apply)

        def failed(failure: Failure) -> None:
            _log.failure("Rescanning {certdir} failed", failure, certdir=self.certdir)

        def done(_: object) -> None:
            self._scanning = None

        d.addErrback(failed)
        d.addBoth(done)
        if self._scanning is None and not d.called:
            self._scanning = d
        return d

    def _tick(self) -> Deferred[None] | None:
        try:
            return self.rescan()
        except Exception:
            _log.failure("Rescanning {certdir} failed", certdir=self.certdir)
            return None

    def start(self) -> None:
        """
        Start the periodic rescan (counted: one per listening port).
        """
        self._users += 1
        if self._users == 1 and self._interval > 0:
            loop = LoopingCall(self._tick)
            loop.clock = self._reactor
            self._loop = loop
            loop.start(self._interval, now=False)

    def stop(self) -> Deferred[None]:
        """
        Undo one L{start}; the last one stops the rescan.  Fires once no
        rescan is in flight.
        """
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()
        scanning = self._scanning
        if self._users == 0 and scanning is not None:
            waiting: Deferred[None] = Deferred()

            def release(result: object) -> object:
                waiting.callback(None)
                return result

            scanning.addBoth(release)
            return waiting
        return succeed(None)


class _SNIMap(SNIMap):  # type: ignore[misc]
    """
    txsni's SNI dispatch, handing out plain OpenSSL connections: txsni's
    connection proxy only serves NPN/ALPN bookkeeping, which an L4 proxy
    does not use, and would add an attribute-forwarding hop to every TLS
    operation on the hot path.
    """

    def serverConnectionForTLS(self, protocol: object) -> Connection:
        return Connection(self.context, None)


# -- the per-connection protocols ---------------------------------------------


@implementer(IHalfCloseableProtocol)
class _TLSServerProtocol(TLSMemoryBIOProtocol):
    """
    Server-side TLS with half-close both ways and an immediate close after
    our C{close_notify}.  (Overrides private hooks of
    L{TLSMemoryBIOProtocol}; the tests pin the behaviour and check that the
    hooks exist.  The hooks used are the same from Twisted 23.10 to 26.10,
    except the factory's connection maker: see L{_connection_maker}.)
    """

    factory: _TLSServerFactory
    _peerFinished = False
    _writeClosed = False
    #: Holds the admission slot when it is the socket-level protocol (see
    #: L{edgeproxy.net.admission}).
    admissionAware = True
    admission: Admission | None = None
    admittedClient: str | None = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        release_admission(self)
        TLSMemoryBIOProtocol.connectionLost(self, reason)

    def makeConnection(self, transport: Any) -> None:
        """
        As L{TLSMemoryBIOProtocol.makeConnection}, minus its one
        C{directlyProvides} call per interface of the transport (about ten
        per connection, a measurable share of a handshake's CPU):
        L{ProtocolWrapper.makeConnection} declares them all in one call.
        """
        self._tlsConnection = self.factory._newTLSConnection(self)
        self._appSendBuffer = []
        ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    # -- reading -------------------------------------------------------------

    def _flushReceiveBIO(self) -> None:
        tls_connection = self._tlsConnection
        while not self._lostTLSConnection and not self._peerFinished:
            try:
                data = tls_connection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                self._endOfPeerData()
                break
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(data)
        if self._tlsConnection is not None:
            self._flushSendBIO()

    def _endOfPeerData(self) -> None:
        """
        The client has finished sending (close_notify, or FIN after a
        completed handshake).
        """
        if self._peerFinished:
            return
        self._peerFinished = True
        if (
            self._handshakeDone
            and not self.disconnecting
            and IHalfCloseableProtocol.providedBy(self.wrappedProtocol)
        ):
            self.wrappedProtocol.readConnectionLost()
        elif self.disconnecting:
            self._shutdownTLS()
        else:
            self.loseConnection()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        """
        As upstream, but an OpenSSL error with an empty error queue (how
        OpenSSL 4 reports some EOFs) is a lost connection on every Twisted:
        newer ones map it so themselves, older ones (23.10) would raise
        C{IndexError} in their EOF check instead.  Error path only.
        """
        if reason is not None:
            value = reason.value
            if (
                isinstance(value, Error)
                and not isinstance(value, SysCallError)
                and not (value.args and value.args[0])
            ):
                # The form of EOF every version recognises (as ConnectionLost).
                reason = Failure(SysCallError(-1, "Unexpected EOF"))
        TLSMemoryBIOProtocol._tlsShutdownFinished(self, reason)

    def readConnectionLost(self) -> None:
        """
        TCP FIN from below: end of the client's data if the handshake is
        done (a missing close_notify is tolerated, as TCP mode would);
        otherwise the handshake failed.
        """
        if self._handshakeDone and not self._lostTLSConnection:
            self._endOfPeerData()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        """
        Our FIN went out below; tell a half-closeable application.
        """
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol) and self._handshakeDone:
            self.wrappedProtocol.writeConnectionLost()

    # -- writing and closing -------------------------------------------------

    def _discard(self, data: bytes) -> None:
        """
        Writes after C{loseWriteConnection} are dropped, as on TCP.
        """

    def loseWriteConnection(self) -> None:
        """
        Send close_notify (then FIN) once the queued data is out; keep
        reading.  Before the handshake, or once the client has finished too,
        or with data still waiting on the handshake, this is a full close.
        """
        if self._writeClosed or self.disconnecting or not self.connected:
            return
        if self._peerFinished or not self._handshakeDone or self._appSendBuffer:
            self.loseConnection()
            return
        self._writeClosed = True
        self.write = self._discard  # type: ignore[method-assign]
        self.writeSequence = self._discard  # type: ignore[method-assign,assignment]
        try:
            self._tlsConnection.shutdown()
        except Error:
            pass
        self._flushSendBIO()
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        elif IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.writeConnectionLost()

    def loseConnection(self) -> None:
        """
        Send close_notify once the queued data is out, then close (without
        waiting for the client's close_notify).  A producer still registered
        is unregistered rather than waited for.
        """
        if self.disconnecting or not self.connected:
            return
        if self._producer is not None:
            self.unregisterProducer()
        TLSMemoryBIOProtocol.loseConnection(self)

    def _shutdownTLS(self) -> None:
        if self._tlsConnection is not None:
            try:
                self._tlsConnection.shutdown()
            except Error:
                pass
            self._flushSendBIO()
        self.transport.loseConnection()  # type: ignore[union-attr]


class _TLSServerFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} building L{_TLSServerProtocol} (no small-write
    aggregation: the proxy writes whole reads).
    """

    protocol = _TLSServerProtocol
    noisy = False

    def __init__(
        self,
        contextFactory: Any,
        isClient: bool,
        wrappedFactory: IProtocolFactory,
        clock: Any = None,
    ) -> None:
        TLSMemoryBIOFactory.__init__(self, contextFactory, isClient, wrappedFactory, clock)
        self._newTLSConnection: Callable[[TLSMemoryBIOProtocol], Connection] = _connection_maker(
            self
        )


def _connection_maker(factory: TLSMemoryBIOFactory) -> Callable[[TLSMemoryBIOProtocol], Connection]:
    """
    The factory's callable making a protocol's OpenSSL connection, ready in
    the right (accept or connect) state: C{_creatorCallable} in newer Twisted
    (26.10), the method C{_createConnection} in older ones (23.10).  Found by
    feature, not version, once per factory rather than per connection.

    @raise RuntimeError: Neither exists (a Twisted this module does not know).
    """
    maker: Callable[[TLSMemoryBIOProtocol], Connection] | None = getattr(
        factory, "_creatorCallable", None
    )
    if maker is None:
        maker = getattr(factory, "_createConnection", None)
    if maker is None:
        raise RuntimeError(
            "unsupported Twisted: TLSMemoryBIOFactory has neither _creatorCallable "
            "nor _createConnection"
        )
    return maker


def _classify(reason: Failure) -> tuple[str, str]:
    """
    (short reason, detail) of a handshake that ended without completing.
    """
    value = reason.value
    if isinstance(value, Error):
        details = []
        for item in value.args[0] if value.args and isinstance(value.args[0], list) else ():
            if isinstance(item, tuple) and item:
                details.append(str(item[-1]))
        detail = "; ".join(details) or str(value)
        text = detail.lower()
        if "version" in text and "wrong version number" not in text:
            return "protocol-version", detail
        if "unsupported protocol" in text:
            return "protocol-version", detail
        if "http request" in text:
            return "plain-http", detail
        if "eof" in text:
            return "eof", detail
        return "bad-handshake", detail
    if isinstance(value, (ConnectionDone, ConnectionLost)):
        return "eof", "closed before the handshake completed"
    return "error", value.__class__.__name__


@implementer(IHandshakeListener)
class _HandshakeGate(Protocol):
    """
    Stands in for the application protocol until the handshake completes;
    owns the handshake timeout.
    """

    _timer: Any = None
    _timedOut = False

    def __init__(self, gateFactory: _GateFactory, addr: IAddress | None) -> None:
        self._gateFactory = gateFactory
        self._addr = addr

    def connectionMade(self) -> None:
        factory = self._gateFactory
        self._timer = factory.reactor.callLater(factory.handshakeTimeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timedOut = True
        transport = self.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        tls = cast(ProtocolWrapper, self.transport)
        app = self._gateFactory.wrappedFactory.buildProtocol(tls.getPeer())
        if app is None:
            tls.loseConnection()
            return
        tls.wrappedProtocol = app
        app.makeConnection(tls)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        """
        Cannot happen: TLS delivers data only after the handshake, by which
        time the application protocol has replaced this one.
        """

    def connectionLost(self, reason: Failure = _DONE) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self._timedOut:
            short, detail = "timeout", f"no handshake within {self._gateFactory.handshakeTimeout}s"
        else:
            short, detail = _classify(reason)
        peer = self._addr
        transport = self.transport
        if transport is not None:
            try:
                peer = transport.getPeer()
            except Exception:
                pass
        _log.info(
            "TLS handshake with {host}:{port} failed ({reason}): {detail}",
            host=getattr(peer, "host", "?"),
            port=getattr(peer, "port", 0),
            reason=short,
            detail=detail,
        )
        metrics = self._gateFactory.metrics
        if metrics is not None:
            metrics.increment("tls_handshake_failed", short)
        self.transport = None


class _GateFactory(Factory):
    """
    Builds L{_HandshakeGate}s; the application factory builds its protocol
    only after a handshake completes.
    """

    noisy = False

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        reactor: Any,
        handshakeTimeout: float,
        metrics: IMetricsStore | None,
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.reactor = reactor
        self.handshakeTimeout = handshakeTimeout
        self.metrics = metrics

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return _HandshakeGate(self, addr)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        prefix: Callable[[], str] | None = getattr(self.wrappedFactory, "logPrefix", None)
        return prefix() if prefix is not None else self.wrappedFactory.__class__.__name__


# -- the endpoint ----------------------------------------------------------------


@implementer(IListeningPort)
class _SNIListeningPort:
    """
    The inner endpoint's port; stopping it also stops the certificate
    rescan.
    """

    def __init__(self, port: IListeningPort, store: CertificateStore) -> None:
        self._port = port
        self._store = store
        self._stopped = False

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None]:
        d = self._port.stopListening()
        if self._stopped:
            return d if isinstance(d, Deferred) else succeed(None)
        self._stopped = True
        waits = [self._store.stop()]
        if isinstance(d, Deferred):
            waits.append(d)
        gathered: Deferred[Any] = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        return gathered.addCallback(lambda _: None)

    def getHost(self) -> IAddress:
        return self._port.getHost()


@implementer(IStreamServerEndpoint)
class SNIServerEndpoint:
    """
    TLS with SNI certificates over another stream server endpoint.
    """

    def __init__(
        self,
        reactor: Any,
        store: CertificateStore,
        inner: IStreamServerEndpoint,
        handshake_timeout: float = 10.0,
        metrics: IMetricsStore | None = None,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.inner = inner
        self.handshake_timeout = handshake_timeout
        self.metrics = metrics

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        gate = _GateFactory(protocolFactory, self.reactor, self.handshake_timeout, self.metrics)
        factory = _TLSServerFactory(self.store.sniMap, False, gate, clock=self.reactor)
        store = self.store
        store.start()
        d: Deferred[Any] = self.inner.listen(factory)

        def listening(port: IListeningPort) -> IListeningPort:
            return _SNIListeningPort(port, store)

        def failed(failure: Failure) -> Failure:
            store.stop()
            return failure

        return d.addCallbacks(listening, failed)


def sni_server_endpoint(
    reactor: Any,
    certdir: str,
    inner: IStreamServerEndpoint,
    *,
    handshake_timeout: float = 10.0,
    metrics: IMetricsStore | None = None,
    rescan_interval: float = 2.0,
) -> IStreamServerEndpoint:
    """
    TLS termination over C{inner} with certificates chosen by SNI from
    C{certdir} (see the module docstring for the layout and behaviour).

    Reads the directory synchronously: call it while configuring, before
    the reactor runs.  C{reactor} must provide C{IReactorTime} and
    C{IReactorThreads} (rescans read files in its thread pool).

    @raise CertificateDirectoryError: The directory is unreadable or has no
        usable C{DEFAULT.pem}.
    """
    store = CertificateStore(os.path.expanduser(certdir), reactor, rescan_interval)
    return SNIServerEndpoint(reactor, store, inner, handshake_timeout, metrics)
