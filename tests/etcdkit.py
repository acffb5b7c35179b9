"""
A real etcd cluster for tests: three members (or any number) of Debian's
C{etcd} binary (package C{etcd-server}) on free loopback ports, data in a
temporary directory (on C{/dev/shm} when there is one: etcd 3.4 has no
C{--unsafe-no-fsync}, so a RAM disk is how its fsyncs stay cheap).

Usage::

    from etcdkit import EtcdCluster, etcd_binary

    cluster = EtcdCluster.start_new(tmp_dir)        # blocks until healthy
    try:
        cluster.endpoints          # ["http://127.0.0.1:p1", ...]
        cluster.url("/t1")         # "etcd://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/t1"
        cluster.put("/t1/backends/a", '{"id": "a", ...}')
        cluster.get("/t1/backends/a")    # the value as text, or None
        cluster.delete("/t1/backends/a")
        cluster.pause(0); cluster.resume(0)     # SIGSTOP / SIGCONT member 0
        cluster.stop(1); cluster.start(1)       # SIGTERM (waits) / same data dir
        cluster.compact()                       # compact at the current revision
    finally:
        cluster.stop_all()

For POP processes: L{pop_options} (the C{twistd edgeproxy} options of one
POP on the cluster) and L{cached_ids} (what a POP's offline cache holds).

The pytest fixtures: C{etcd_cluster} (session scope: one cluster for every
test; a test that pauses or stops a member must resume or start it again,
which L{EtcdCluster.heal} does) and C{etcd_prefix} (a fresh key prefix per
test, so tests never see each other's keys).  Every request here uses the
v3 JSON gateway with the standard library (blocking: test code only, never
on a reactor a test is checking).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import attrs
import pytest

LOCALHOST = "127.0.0.1"

#: Raft timings for tests (ms): a lost leader is replaced in well under 1 s.
HEARTBEAT_MS = 50
ELECTION_MS = 500


def etcd_binary() -> Optional[str]:
    """
    The etcd server binary, or C{None} when it is not installed.
    """
    return shutil.which("etcd")


def require_etcd() -> str:
    """
    The etcd binary, or skip the test with the install command.
    """
    binary = etcd_binary()
    if binary is None:
        pytest.skip("etcd is not installed: apt-get install etcd-server")
    return binary


def free_port() -> int:
    """
    A TCP port free on loopback just now.
    """
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def b64(text: str | bytes) -> str:
    """
    Base64 of C{text} (UTF-8), as the gateway wants keys and values.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """
    The C{range_end} that makes a range cover every key under C{prefix}.
    """
    raw = bytearray(prefix.encode("utf-8"))
    raw[-1] += 1
    return raw.decode("utf-8")


class EtcdRequestError(Exception):
    """
    A gateway request failed; C{status} is the HTTP status (0: no answer).
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{status}: {message}")


@attrs.frozen
class TlsFiles:
    """
    PEM files: a CA, a server certificate for 127.0.0.1 and a client
    certificate, both from the CA, with their keys.
    """

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: str) -> TlsFiles:
    """
    Make a CA and two certificates in C{directory} (C{cryptography}).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def key_pem(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("etcdkit CA"))
        .issuer_name(name("etcdkit CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(common: str, usage: Any, server: bool) -> Tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(LOCALHOST)), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    files: Dict[str, bytes] = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    # etcd's JSON gateway connects to its own gRPC port with the server
    # certificate: it must be good for client authentication too.
    files["server.pem"], files["server-key.pem"] = issue(
        "etcd", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], True
    )
    files["client.pem"], files["client-key.pem"] = issue(
        "edgeproxy", [ExtendedKeyUsageOID.CLIENT_AUTH], False
    )
    os.makedirs(directory, exist_ok=True)
    for file_name, data in files.items():
        with open(os.path.join(directory, file_name), "wb") as f:
            f.write(data)
    return TlsFiles(
        ca=os.path.join(directory, "ca.pem"),
        server_cert=os.path.join(directory, "server.pem"),
        server_key=os.path.join(directory, "server-key.pem"),
        client_cert=os.path.join(directory, "client.pem"),
        client_key=os.path.join(directory, "client-key.pem"),
    )


def _stopped(pid: int) -> bool:
    """
    Whether every thread of process C{pid} is stopped (Linux C{/proc}).
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"T", b"t"):
            return False
    return True


@attrs.define
class Member:
    """
    One etcd member: its name, ports, data directory and process.
    """

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    process: Optional["subprocess.Popen[bytes]"] = None
    paused: bool = False
    tls: bool = False

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOCALHOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOCALHOST}:{self.peer_port}"


@attrs.define
class EtcdCluster:
    """
    A running etcd cluster on loopback (see the module docstring).

    @ivar token: An auth token sent with every request once
        L{enable_auth} has run (the root user's).
    """

    binary: str
    base_dir: str
    members: List[Member]
    token: Optional[str] = None
    tls: Optional["TlsFiles"] = None
    extra_args: List[str] = attrs.field(factory=list)
    _cluster_token: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])

    # --- life cycle --------------------------------------------------------

    @classmethod
    def start_new(
        cls,
        base_dir: Optional[str] = None,
        size: int = 3,
        timeout: float = 30.0,
        tls: bool = False,
        extra_args: Optional[List[str]] = None,
    ) -> "EtcdCluster":
        """
        Start a new cluster of C{size} members and wait until it is healthy
        (skips the test when etcd is not installed).

        @param tls: Serve clients over TLS with a certificate for 127.0.0.1
            from a CA made here, and require client certificates from that
            CA (the files are in L{EtcdCluster.tls}).
        @param extra_args: More etcd flags, e.g. C{["--auth-token-ttl", "1"]}.
        """
        binary = require_etcd()
        if base_dir is None:
            base_dir = tempfile.mkdtemp(
                prefix="etcdkit-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
            )
        members = []
        for i in range(size):
            name = f"m{i}"
            members.append(
                Member(
                    name=name,
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=os.path.join(base_dir, name),
                    log_path=os.path.join(base_dir, f"{name}.log"),
                )
            )
        files = make_tls_files(base_dir) if tls else None
        for member in members:
            member.tls = tls
        cluster = cls(
            binary=binary,
            base_dir=base_dir,
            members=members,
            tls=files,
            extra_args=list(extra_args or ()),
        )
        for i in range(size):
            cluster.start(i, wait=False)
        try:
            cluster.wait_healthy(timeout)
        except BaseException:
            cluster.stop_all()
            raise
        return cluster

    def _command(self, member: Member) -> List[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            self.binary,
            "--name",
            member.name,
            "--data-dir",
            member.data_dir,
            "--listen-client-urls",
            member.client_url,
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            member.peer_url,
            "--initial-advertise-peer-urls",
            member.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-token",
            self._cluster_token,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            str(HEARTBEAT_MS),
            "--election-timeout",
            str(ELECTION_MS),
            "--snapshot-count",
            "10000",
            "--logger",
            "zap",
            "--log-level",
            "warn",
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> List[str]:
        if self.tls is None:
            return []
        return [
            "--cert-file",
            self.tls.server_cert,
            "--key-file",
            self.tls.server_key,
            "--trusted-ca-file",
            self.tls.ca,
            "--client-cert-auth",
        ]

    def start(self, i: int, wait: bool = True, timeout: float = 20.0) -> None:
        """
        Start member C{i} (again: with its data directory, it rejoins).
        """
        member = self.members[i]
        if member.process is not None and member.process.poll() is None:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        log = open(member.log_path, "ab")
        try:
            member.process = subprocess.Popen(
                self._command(member),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            log.close()
        member.paused = False
        if wait:
            self.wait_member(i, timeout)

    def stop(self, i: int, timeout: float = 10.0) -> None:
        """
        Stop member C{i} (SIGTERM, SIGKILL after C{timeout}) and wait.
        """
        member = self.members[i]
        process = member.process
        if process is None:
            return
        if member.paused:
            process.send_signal(signal.SIGCONT)
            member.paused = False
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        member.process = None

    def stop_all(self) -> None:
        """
        Stop every member (the data stays until L{destroy}).
        """
        for i in range(len(self.members)):
            self.stop(i)

    def destroy(self) -> None:
        """
        Stop every member and remove the data directory.
        """
        self.stop_all()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def pause(self, i: int) -> None:
        """
        SIGSTOP member C{i}: its sockets stay open, requests to it hang.
        """
        member = self.members[i]
        assert member.process is not None, f"member {i} is not running"
        member.process.send_signal(signal.SIGSTOP)
        member.paused = True
        # The signal is asynchronous: wait until every thread has stopped,
        # so that nothing the test does next is served by this member.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not _stopped(member.process.pid):
            time.sleep(0.001)

    def resume(self, i: int) -> None:
        """
        SIGCONT member C{i}.
        """
        member = self.members[i]
        assert member.process is not None, f"member {i} is not running"
        member.process.send_signal(signal.SIGCONT)
        member.paused = False

    def heal(self, timeout: float = 20.0) -> None:
        """
        Resume every paused member, start every stopped one, and wait until
        the cluster is healthy (for a test's C{finally}).
        """
        for i, member in enumerate(self.members):
            if member.paused:
                self.resume(i)
            if member.process is None or member.process.poll() is not None:
                member.process = None
                self.start(i, wait=False)
        self.wait_healthy(timeout)

    # --- addresses ---------------------------------------------------------

    @property
    def endpoints(self) -> List[str]:
        """
        The members' client URLs, C{http://127.0.0.1:port}.
        """
        return [m.client_url for m in self.members]

    @property
    def hostports(self) -> List[str]:
        return [f"{LOCALHOST}:{m.client_port}" for m in self.members]

    def url(self, prefix: str, scheme: str = "etcd", members: Optional[List[int]] = None) -> str:
        """
        The C{--db} value for this cluster and C{prefix}:
        C{etcd://h:p,h:p,h:p/prefix} (C{members}: only those, in that order).
        """
        hostports = self.hostports
        if members is not None:
            hostports = [hostports[i] for i in members]
        return f"{scheme}://{','.join(hostports)}/{prefix.lstrip('/')}"

    # --- requests ----------------------------------------------------------

    def request(
        self,
        path: str,
        body: Dict[str, Any],
        member: Optional[int] = None,
        timeout: float = 2.0,
        token: Optional[str] = None,
        deadline: float = 20.0,
    ) -> Dict[str, Any]:
        """
        POST C{body} as JSON to C{path} (C{/v3/...}) on member C{member}
        and return the decoded answer.  Without C{member}: the running,
        unpaused members in turn, again while the answer is a timeout or a
        leader change (a paused leader loses proposals until the others
        elect a new one), for up to C{deadline} seconds.

        @raise EtcdRequestError: Not a 200 answer, or no answer.
        """
        if member is not None:
            return self._request(path, body, member, timeout, token)
        end = time.monotonic() + deadline
        attempt = 0
        while True:
            candidates = [
                i
                for i, m in enumerate(self.members)
                if m.process is not None and not m.paused and m.process.poll() is None
            ]
            if not candidates:
                raise EtcdRequestError(0, "no member is running")
            try:
                return self._request(
                    path, body, candidates[attempt % len(candidates)], timeout, token
                )
            except EtcdRequestError as e:
                transient = e.status == 0 or e.status >= 500 or "leader" in str(e)
                if not transient or time.monotonic() > end:
                    raise
            attempt += 1
            time.sleep(0.05)

    def _request(
        self,
        path: str,
        body: Dict[str, Any],
        member: int,
        timeout: float,
        token: Optional[str],
    ) -> Dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        token = token if token is not None else self.token
        if token:
            headers["Authorization"] = token
        req = urllib.request.Request(
            self.members[member].client_url + path,
            data=json.dumps(body).encode("utf-8"),
            headers=headers,
            method="POST",
        )
        try:
            context = None
            if self.tls is not None:
                context = ssl.create_default_context(cafile=self.tls.ca)
                context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
            with urllib.request.urlopen(req, timeout=timeout, context=context) as response:
                answer = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise EtcdRequestError(e.code, e.read().decode("utf-8", "replace")) from None
        except (OSError, ValueError) as e:
            raise EtcdRequestError(0, str(e)) from None
        if not isinstance(answer, dict):
            raise EtcdRequestError(200, f"not a JSON object: {answer!r}")
        return answer

    def put(self, key: str, value: str | bytes, lease: Optional[int] = None) -> int:
        """
        Put C{value} at C{key}; return the new revision.
        """
        body: Dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease is not None:
            body["lease"] = str(lease)
        answer = self.request("/v3/kv/put", body)
        return int(answer["header"]["revision"])

    def get(self, key: str) -> Optional[str]:
        """
        The value at C{key} as text, or C{None}.
        """
        answer = self.request("/v3/kv/range", {"key": b64(key)})
        kvs = answer.get("kvs") or []
        if not kvs:
            return None
        return unb64(kvs[0].get("value", "")).decode("utf-8", "replace")

    def get_prefix(self, prefix: str) -> Dict[str, str]:
        """
        Every key under C{prefix} -> its value as text.
        """
        answer = self.request(
            "/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
        )
        return {
            unb64(kv["key"]).decode("utf-8", "replace"): unb64(kv.get("value", "")).decode(
                "utf-8", "replace"
            )
            for kv in answer.get("kvs") or []
        }

    def delete(self, key: str) -> int:
        """
        Delete C{key}; return how many keys went.
        """
        answer = self.request("/v3/kv/deleterange", {"key": b64(key)})
        return int(answer.get("deleted", 0))

    def revision(self) -> int:
        """
        The cluster's current revision.
        """
        answer = self.request("/v3/kv/range", {"key": b64("\0"), "count_only": True})
        return int(answer["header"]["revision"])

    def compact(self, revision: Optional[int] = None) -> int:
        """
        Compact the key-value history at C{revision} (default: the current
        one); a watch from an older revision is then refused as compacted.
        """
        if revision is None:
            revision = self.revision()
        self.request("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def lease_ttl(self, lease: int) -> int:
        """
        The remaining TTL of C{lease} in seconds (-1: expired or unknown).
        """
        answer = self.request("/v3/lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1))

    def enable_auth(self, password: str, user: str = "edgeproxy", prefix: str = "/") -> None:
        """
        Add C{root} and C{user} (both with C{password}), give C{user}
        read-write on C{prefix}, and turn authentication on; from then on
        this kit authenticates as root.
        """
        self.request("/v3/auth/user/add", {"name": "root", "password": password})
        self.request("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.request("/v3/auth/role/add", {"name": "edgeproxy"})
        self.request(
            "/v3/auth/role/grant",
            {
                "name": "edgeproxy",
                "perm": {
                    "permType": "READWRITE",
                    "key": b64(prefix),
                    "range_end": b64(prefix_end(prefix)),
                },
            },
        )
        self.request("/v3/auth/user/add", {"name": user, "password": password})
        self.request("/v3/auth/user/grant", {"user": user, "role": "edgeproxy"})
        self.request("/v3/auth/enable", {})
        self.token = self.authenticate("root", password)

    def authenticate(self, user: str, password: str) -> str:
        """
        An auth token for C{user}.
        """
        answer = self.request(
            "/v3/auth/authenticate", {"name": user, "password": password}, token=""
        )
        return str(answer["token"])

    # --- health ------------------------------------------------------------

    def member_healthy(self, i: int, timeout: float = 1.0) -> bool:
        """
        Whether member C{i} answers a linearizable read (so it has a leader).
        """
        try:
            self.request("/v3/kv/range", {"key": b64("health")}, member=i, timeout=timeout)
        except EtcdRequestError as e:
            # Auth errors still prove the member serves requests.
            return e.status in (400, 401, 403) and "auth" in str(e).lower()
        return True

    def wait_member(self, i: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.members[i].process
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"etcd member {i} exited with {process.returncode}: see "
                    f"{self.members[i].log_path}\n{self._tail(i)}"
                )
            if self.member_healthy(i):
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd member {i} not healthy after {timeout} s\n{self._tail(i)}")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """
        Wait until every running, unpaused member serves reads.
        """
        deadline = time.monotonic() + timeout
        for i, member in enumerate(self.members):
            if member.process is None or member.paused:
                continue
            self.wait_member(i, max(0.1, deadline - time.monotonic()))

    def _tail(self, i: int) -> str:
        try:
            with open(self.members[i].log_path, "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""


def pop_options(
    cluster: EtcdCluster,
    prefix: str,
    region: str,
    directory: str,
    admin_port: int,
    token_file: str,
    heartbeat_ttl: float = 3.0,
    listen: str = "tcp:0:interface=127.0.0.1",
) -> List[str]:
    """
    The C{twistd edgeproxy} options of one POP on C{cluster} (for
    L{faultkit.edgeproxy_argv}): its own offline cache and state file in
    C{directory} (POPs on one machine must not share them), the admin API
    on C{admin_port} with the tokens of C{token_file}, no GeoIP database.
    """
    return [
        f"--db={cluster.url(prefix)}",
        f"--db-cache={os.path.join(directory, f'{region}-etcd-cache.db')}",
        f"--state-file={os.path.join(directory, f'{region}-state.json')}",
        f"--region={region}",
        f"--listen={listen}",
        f"--admin=tcp:{admin_port}:interface={LOCALHOST}",
        f"--api-token-file={token_file}",
        f"--heartbeat-ttl={heartbeat_ttl:g}",
        "--geoip-db=none",
    ]


def cached_ids(path: str) -> List[str]:
    """
    The backend ids in an offline cache file (empty when there is none
    yet), to wait for the cache before stopping etcd.
    """
    import sqlite3

    if not os.path.exists(path):
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sorted(str(r[0]) for r in conn.execute("SELECT id FROM backends"))
    except sqlite3.Error:
        return []
    finally:
        conn.close()


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """
    One three-member cluster for the session (skipped when etcd is absent).
    """
    require_etcd()
    cluster = EtcdCluster.start_new()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def etcd_prefix(etcd_cluster: EtcdCluster) -> Iterator[str]:
    """
    A key prefix no other test uses (C{/t-<random>}); the cluster is healed
    after the test (paused members resumed, stopped ones started).
    """
    yield f"/t-{uuid.uuid4().hex[:10]}"
    etcd_cluster.heal()
