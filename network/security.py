"""CURVE keys per host, and the socket options that use them.

Layout of a keys directory (made by `meshctl keys generate`):

    keys/public/<host>.key            public certificate of each host (copy these to every host)
    keys/private/<host>.key_secret    secret certificate; stays on its own host

Every TCP endpoint of a host is a CURVE server with that host's key pair. A client connects
with its own host's key pair and the server host's public key, and the server admits only
client keys found in keys/public/ (ZAP, via pyzmq's ThreadAuthenticator). Refused handshakes
are seen through a socket monitor, logged and counted.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

REFUSAL_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake",
}


class MissingKey(Exception):
    """A key that should be there is missing or unreadable."""


@dataclass(frozen=True)
class CurveIdentity:
    """What one host needs to speak CURVE: its own key pair and the public keys it trusts."""

    host: str
    public: bytes
    secret: bytes
    public_dir: Path
    known: dict[str, bytes] = field(default_factory=dict)

    def server_key(self, host: str) -> bytes:
        try:
            return self.known[host]
        except KeyError:
            raise MissingKey(f"no public key for host {host!r} in {self.public_dir}: copy {host}.key there "
                            f"from that host's keys/public/") from None


def public_path(keys_dir: Path, host: str) -> Path:
    return Path(keys_dir) / "public" / f"{host}.key"


def secret_path(keys_dir: Path, host: str) -> Path:
    """`host`'s secret key: keys_dir/private/HOST.key_secret; in a container, the file MESH_CURVE_SECRET_FILE
    names (the Podman secret `podman_build.sh deploy` mounts, readable by the agent only), or the key file's
    text in MESH_CURVE_SECRET (a Kubernetes Secret as an environment variable), kept in a file of this
    process's own."""
    if os.environ.get("MESH_CURVE_SECRET_FILE"):
        return Path(os.environ["MESH_CURVE_SECRET_FILE"])
    if os.environ.get("MESH_CURVE_SECRET"):
        return _secret_from_env(os.environ["MESH_CURVE_SECRET"])
    return Path(keys_dir) / "private" / f"{host}.key_secret"


_from_env: dict[str, Path] = {}


def _secret_from_env(text: str) -> Path:
    if text not in _from_env:
        fd, name = tempfile.mkstemp(prefix="mesh-curve-", suffix=".key_secret")   # mode 0600, this user's
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _from_env[text] = Path(name)
    return _from_env[text]


def generate_command(keys_dir: Path, host: str) -> str:
    """The exact `meshctl keys generate` that makes `host`'s key pair in `keys_dir` (run where `meshctl` runs)."""
    where = "" if Path(keys_dir) == Path("keys") else f" --keys-dir {keys_dir}"
    return f"meshctl keys generate {host}{where}"


def generate(keys_dir: Path, host: str, *, force: bool = False) -> tuple[Path, Path]:
    """Writes a new key pair for `host`; refuses to overwrite one unless `force`."""
    keys_dir = Path(keys_dir)
    pub, sec = public_path(keys_dir, host), secret_path(keys_dir, host)
    if sec.exists() and not force:
        raise FileExistsError(f"{sec} exists; pass --force to replace it (every peer then needs the new public key)")
    (keys_dir / "public").mkdir(parents=True, exist_ok=True)
    (keys_dir / "private").mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir / "private", 0o700)
    tmp = keys_dir / "private" / ".tmp"
    tmp.mkdir(exist_ok=True)
    made_pub, made_sec = zmq.auth.create_certificates(str(tmp), host)
    shutil.move(made_pub, pub)
    shutil.move(made_sec, sec)
    tmp.rmdir()
    os.chmod(sec, 0o600)
    return pub, sec


def list_keys(keys_dir: Path) -> list[tuple[str, str, bool]]:
    """(host, public key as Z85 text, whether its secret key is here) for every public key."""
    out = []
    for path in sorted((Path(keys_dir) / "public").glob("*.key")):
        public, _ = zmq.auth.load_certificate(str(path))
        host = path.stem
        out.append((host, public.decode(), secret_path(keys_dir, host).exists()))
    return out


def load_identity(keys_dir: Path, host: str) -> CurveIdentity:
    keys_dir = Path(keys_dir)
    sec = secret_path(keys_dir, host)
    if not sec.exists():
        raise MissingKey(f"CURVE is on but {sec} is missing: run `{generate_command(keys_dir, host)}` on this host")
    public, secret = zmq.auth.load_certificate(str(sec))
    if secret is None:
        raise MissingKey(f"{sec} holds no secret key")
    known = {}
    for path in (keys_dir / "public").glob("*.key"):
        known[path.stem] = zmq.auth.load_certificate(str(path))[0]
    return CurveIdentity(host=host, public=public, secret=secret, public_dir=keys_dir / "public", known=known)


class Guard:
    """CURVE for one zmq Context: configures sockets, and runs the ZAP authenticator once the
    context has a server socket (a client-only context, like a CLI's, needs none).

    With `identity=None` every method is a no-op, so callers need not branch on security.
    """

    def __init__(self, ctx: zmq.Context, identity: CurveIdentity | None):
        self.ctx = ctx
        self.identity = identity
        self._auth: ThreadAuthenticator | None = None

    @property
    def enabled(self) -> bool:
        return self.identity is not None

    def server(self, sock: zmq.Socket) -> None:
        if self.identity is None:
            return
        if self._auth is None:
            self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("network.security.zap"))
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.identity.public_dir))
        sock.curve_secretkey = self.identity.secret
        sock.curve_publickey = self.identity.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, server_host: str) -> None:
        if self.identity is None:
            return
        sock.curve_secretkey = self.identity.secret
        sock.curve_publickey = self.identity.public
        sock.curve_serverkey = self.identity.server_key(server_host)

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class RefusalMonitor:
    """Watches a bound socket for failed handshakes (wrong key, no key, not CURVE at all)."""

    def __init__(self, sock: zmq.Socket, on_refused):
        self.socket = sock.get_monitor_socket(events=sum(REFUSAL_EVENTS))
        self._on_refused = on_refused

    def on_readable(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            reason = REFUSAL_EVENTS.get(event["event"], "handshake")
            self._on_refused(reason, event.get("endpoint", b"").decode(errors="replace"))

    def close(self) -> None:
        self.socket.close(linger=0)
