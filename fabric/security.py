"""CurveZMQ keys: encryption of every connection to a broker, and an allow-list of who may connect.

Whoever can submit a call can run code on the cluster, as the cluster's owner, and on a shared
host loopback is no boundary: every local user can reach ``127.0.0.1``. So every broker that
listens on TCP, loopback included, is a CURVE server by default (docs/security.md):

- ``FABRIC_KEYS=DIR`` (or ``--keys DIR`` on the ``fabric`` command): that keys directory, for
  every connection, ``tcp://`` and ``ipc://`` alike. Needed to listen beyond loopback.
- unset: the owner's default keys directory ``DATA/keys`` (``DATA`` is fabric's data folder,
  ``FABRIC_HOME``), made on first use (owner-only), for every ``tcp://`` address. The same
  user's drivers, executors, workers and CLI find it there, so nothing needs configuring; another
  user's processes have keys of their own, which this broker does not know, and are refused in
  the handshake with a message naming the public key to have allow-listed.
  ``ipc://`` (the embedded cluster) stays plain: its socket is in a 0700 folder.
- ``FABRIC_KEYS=none``: no keys (plaintext; loopback or ``ipc://`` only; a benchmark's baseline).
  ``FABRIC_ALLOW_INSECURE_REMOTE=1`` without ``FABRIC_KEYS`` also means no keys, and lets a
  broker listen on a network in plaintext (a test rig's isolated network only).

A connection whose public key is not allow-listed is refused during the handshake, before it
can send a message; the broker logs each refusal (at most once a minute per reason) and goes on.

The keys directory (``fabric keys init DIR`` makes one; files in pyzmq's certificate format,
``zmq.auth.create_certificates``)::

    DIR/                     mode 0700; every file 0600
      broker.key             the broker's public key: every host needs it
      broker.key_secret      the broker's secret key: the broker's host only
      client.key[_secret]    a driver's key pair (fabric.init, fabric status/stop, nested calls)
      executor.key[_secret]  an executor's key pair (executor daemon and its workers)
      clients/NAME.key       allow-list, read by the broker: public keys of drivers
      executors/NAME.key     allow-list, read by the broker: public keys of executors

A process that connects uses its role's pair (``client`` or ``executor``), else the other one,
so one pair is enough on a host. The broker accepts a key found in either allow-list folder
(the two folders say whose key is whose; the trust is the same: a driver runs code on the
executors, and a worker's nested calls connect as a driver). The allow-list is read at every
new connection, so adding or deleting a ``.key`` file takes effect without a restart, for
connections made afterwards.

Secret keys are never logged; errors and logs show public keys only. The ZAP handler runs only
during a connection's handshake, never per message.
"""
from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref

import zmq

from . import config
from . import settings
from .errors import ConnectionFailed, FabricError

ENV = "FABRIC_KEYS"
OFF = ("none", "off", "no", "0", "false")   # FABRIC_KEYS=none: no keys, plaintext
INSECURE = "FABRIC_ALLOW_INSECURE_REMOTE"
ROLES = ("client", "executor")
ALLOW_DIRS = {"client": "clients", "executor": "executors"}
ZAP_DOMAIN = b"fabric"

log = logging.getLogger("fabric.security")


# ----------------------------------------------------------------------------- the keys directory
def explicit_dir() -> str | None:
    """The keys directory ``FABRIC_KEYS`` names (None when unset or ``none``)."""
    path = (settings.get().keys or "").strip()
    if not path or path.lower() in OFF:
        return None
    return os.path.abspath(os.path.expanduser(path))


def keyless() -> bool:
    """Keys turned off on purpose: ``FABRIC_KEYS=none``, or the insecure opt-in without keys."""
    s = settings.get()
    path = (s.keys or "").strip()
    return path.lower() in OFF if path else s.allow_insecure_remote


def keys_dir(address: str | None = None) -> str | None:
    """The keys directory a connection to (or a broker at) ``address`` uses, or None: plain.
    ``FABRIC_KEYS`` when set; else, for a ``tcp://`` address, the owner's default directory
    (made on first use); else None (``ipc://`` in a private folder, or keys turned off)."""
    root = explicit_dir()
    if root is not None or keyless():
        return root
    if address is not None and address.startswith("tcp://"):
        return ensure_default()
    return None


def configured() -> bool:
    """Whether a keys directory was given (``FABRIC_KEYS``/``--keys``): needed beyond loopback."""
    return explicit_dir() is not None


def default_dir() -> str:
    """The owner's default keys directory: ``keys`` in fabric's data folder."""
    return os.path.join(config.data_dir(), "keys")


def ensure_default() -> str:
    """The default keys directory, made (``init_keys``) if it is not there yet. Made in a
    private temporary folder beside it and renamed into place, so processes starting at once
    (a broker and its executor, two drivers) end up with one set of keys."""
    try:
        root = default_dir()
    except OSError as e:
        raise FabricError(f"cannot make this user's CurveZMQ keys: fabric's data folder is not usable ({e}); set "
                          f"FABRIC_HOME to a folder of yours, or FABRIC_KEYS to a keys directory") from None
    if os.path.exists(os.path.join(root, "broker.key_secret")):
        return root
    if os.path.isdir(root) and os.listdir(root):
        raise FabricError(f"{root} (this user's default CurveZMQ keys) holds files but no broker.key_secret; "
                          f"move it aside so fabric can make new keys there, or set FABRIC_KEYS to a keys directory")
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=".keys-", dir=os.path.dirname(root))
        init_keys(tmp)
        try:
            os.rename(tmp, root)  # replaces an empty folder; fails if another process got there first
            tmp = None
            log.info("made this user's CurveZMQ keys in %s", root)
        except OSError:
            if not os.path.exists(os.path.join(root, "broker.key_secret")):
                raise
    except OSError as e:
        raise FabricError(f"cannot make this user's CurveZMQ keys in {root}: {e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _load(path: str, secret: bool):
    import zmq.auth

    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise FabricError(f"cannot read the key file {path}: {e}") from None
    if secret and not sec:
        raise FabricError(f"{path} holds no secret key")
    return public, sec


def broker_public(root: str) -> bytes:
    path = os.path.join(root, "broker.key")
    if not os.path.exists(path):
        raise FabricError(f"{ENV}={root} has no broker.key (the broker's public key); copy it from the "
                          f"broker's keys directory, or make keys with `fabric keys init DIR`")
    return _load(path, secret=False)[0]


def own_pair(root: str, role: str) -> tuple[bytes, bytes, str]:
    """(public, secret, file) of this process's identity: its role's pair, else the other role's."""
    for r in (role, *(x for x in ROLES if x != role)):
        path = os.path.join(root, f"{r}.key_secret")
        if os.path.exists(path):
            public, secret = _load(path, secret=True)
            return public, secret, path
    raise FabricError(f"{ENV}={root} has no key pair for this process (client.key_secret or "
                      f"executor.key_secret); make one on the broker's host with `fabric keys add-{role} NAME`")


def allowed_keys(root: str) -> dict[bytes, str]:
    """Allow-listed public keys (z85) -> where they come from (``clients/NAME.key``)."""
    out = {}
    for folder in ALLOW_DIRS.values():
        for path in sorted(glob.glob(os.path.join(root, folder, "*.key"))):
            try:
                out[_load(path, secret=False)[0]] = os.path.join(folder, os.path.basename(path))
            except FabricError as e:
                log.warning("ignored an allow-list entry: %s", e)
    return out


def check(root: str, *, broker_secret: bool = False, pair: str | None = None):
    """Raise FabricError if ``root`` lacks what a process needs (the CLI checks up front)."""
    if not os.path.isdir(root):
        raise FabricError(f"the keys directory {root} does not exist; make one with `fabric keys init {root}`")
    broker_public(root)
    if broker_secret:
        path = os.path.join(root, "broker.key_secret")
        if not os.path.exists(path):
            raise FabricError(f"{root} has no broker.key_secret: it is not a broker's keys directory (the one "
                              f"`fabric keys init` made, on the broker's host)")
        _load(path, secret=True)
    if pair:
        own_pair(root, pair)


# ----------------------------------------------------------------------------- making keys
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _make_pair(folder: str, name: str) -> str:
    """``folder/name.key`` + ``name.key_secret`` (0600); returns the public file's path."""
    import zmq.auth

    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o600)
    os.chmod(secret, 0o600)
    return public


def _copy(src: str, dst: str):
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)


def _private_dir(path: str):
    config.private_dir(path)
    os.chmod(path, 0o700)


def init_keys(root: str) -> dict:
    """A new keys directory: the broker's pair, a client pair and an executor pair, both
    allow-listed. Enough for a cluster whose hosts all get a copy of the directory."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.exists(os.path.join(root, "broker.key_secret")):
        raise FabricError(f"{root} already holds keys (broker.key_secret); choose another directory")
    _private_dir(root)
    for folder in ALLOW_DIRS.values():
        _private_dir(os.path.join(root, folder))
    _make_pair(root, "broker")
    for role in ROLES:
        _copy(_make_pair(root, role), os.path.join(root, ALLOW_DIRS[role], f"{role}.key"))
    return {"dir": root, "broker": broker_public(root).decode()}


def add_key(root: str, role: str, name: str, out: str | None = None, public_key: str | None = None) -> dict:
    """Allow-list a new ``role`` key under ``name``. With ``public_key`` (a ``.key`` file made
    elsewhere) only that public key is added; else a new pair is made in ``out``, a keys
    directory for the new host (broker.key + ``role.key[_secret]``), ready to copy there."""
    if role not in ROLES:
        raise ValueError(role)
    if not _NAME.match(name):
        raise FabricError(f"{name!r} is not a usable name: letters, digits, '_', '.', '-'")
    root = os.path.abspath(os.path.expanduser(root))
    check(root, broker_secret=True)  # the allow-list lives beside the broker's own keys
    allow_dir = os.path.join(root, ALLOW_DIRS[role])
    _private_dir(allow_dir)
    allow = os.path.join(allow_dir, f"{name}.key")
    if os.path.exists(allow):
        raise FabricError(f"{allow} exists already; delete it to revoke that key, or choose another name")
    if public_key is not None:
        pub, sec = _load(public_key, secret=False)
        if sec:
            raise FabricError(f"{public_key} holds a secret key: give the public .key file instead")
        _copy(public_key, allow)
        return {"allowed": allow, "public": pub.decode(), "dir": None}
    out = os.path.abspath(os.path.expanduser(out or f"fabric-keys-{name}"))
    if os.path.exists(out) and os.listdir(out):
        raise FabricError(f"{out} exists and is not empty; choose another --out")
    _private_dir(out)
    _copy(os.path.join(root, "broker.key"), os.path.join(out, "broker.key"))
    pub_file = _make_pair(out, role)
    _copy(pub_file, allow)
    return {"allowed": allow, "public": _load(pub_file, secret=False)[0].decode(), "dir": out}


# ----------------------------------------------------------------------------- the broker's side
class _AllowList:
    """The ZAP credentials check: is this public key in ``clients/`` or ``executors/``?"""

    def __init__(self, root):
        self.root = root
        self.logged: dict[bytes, float] = {}

    def callback(self, domain, key):  # key: the z85 public key of the connecting peer
        try:
            if key in allowed_keys(self.root):
                return True
            now = time.monotonic()
            if now - self.logged.get(key, -1e9) > 60:  # at most once a minute per key
                self.logged[key] = now
                log.warning("refused a connection: public key %s is not allow-listed in %s/clients or "
                            "%s/executors", key.decode(errors="replace"), self.root, self.root)
            return False
        except Exception:  # noqa: BLE001 - the handler must answer, and fail closed
            log.exception("the allow-list check failed; refusing the connection")
            return False


_authenticators: dict = {}


def curve_server(sock, address: str | None = None) -> bool:
    """Make ``sock`` (the broker's ROUTER, before it binds ``address``) a CURVE server whose
    peers must have an allow-listed key; returns False, changing nothing, when this address
    takes no keys (:func:`keys_dir`). The ZAP handler (pyzmq's ThreadAuthenticator, one thread
    per context) runs only at handshakes. ``ZAP_ENFORCE_DOMAIN`` makes a missing handler refuse
    connections instead of accepting them."""
    root = keys_dir(address)
    if root is None:
        return False
    if not zmq.has("curve"):
        raise FabricError(f"this libzmq has no CURVE support, and the broker at {address} needs CurveZMQ keys "
                          f"(set {ENV}=none to run without them, on a host no one else uses)")
    check(root, broker_secret=True)
    public, secret = _load(os.path.join(root, "broker.key_secret"), secret=True)
    ctx = sock.context
    if ctx not in _authenticators:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=logging.getLogger("fabric.security.zap"))
        auth.start()
        auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=_AllowList(root))
        _authenticators[ctx] = auth
    sock.zap_domain = ZAP_DOMAIN
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):
        pass
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    _log_refusals(sock, address or "")
    log.info("CurveZMQ on: broker public key %s, %d allow-listed keys in %s", public.decode(),
             len(allowed_keys(root)), root)
    return True


def _log_refusals(sock, address):
    """Log the handshakes the broker refused before the allow-list could be asked: a peer
    without keys, or one that does not hold this broker's public key (another user's or another
    cluster's keys). Refused keys are logged by :class:`_AllowList`. A daemon thread reads the
    ROUTER's monitor: handshakes only, never per message."""
    events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    addr = f"inproc://fabric-broker-handshakes-{os.getpid()}-{next(_seq)}"
    try:
        sock.monitor(addr, events)
    except zmq.ZMQError:
        return

    def run():
        from zmq.utils.monitor import recv_monitor_message

        mon = sock.context.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        last, quiet = -1e9, 0
        try:
            mon.connect(addr)
            while True:
                ev = recv_monitor_message(mon)
                if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                now = time.monotonic()
                if now - last < 60:  # a refused peer retries every ~0.1 s: once a minute is enough
                    quiet += 1
                    continue
                last = now
                more = f" ({quiet} more since the last such line)" if quiet else ""
                quiet = 0
                log.warning("refused a connection on %s: the CurveZMQ handshake failed, before any message. The "
                            "peer has no keys, or not this broker's public key (another user's process, or keys of "
                            "another cluster); to let someone in, allow-list their public key with `fabric keys "
                            "add-client NAME --public-key FILE` (docs/security.md)%s", address, more)
        except zmq.ZMQError:
            pass  # the context is ending
        finally:
            mon.close(0)

    threading.Thread(target=run, name="fabric-handshakes", daemon=True).start()


# ----------------------------------------------------------------------------- the connecting side
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_monitors: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # socket -> its monitor PAIR
_refusals: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # socket -> ConnectionFailed
_roles: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()      # socket -> (role, key file, public, own)
_seq = itertools.count()


def curve_client(sock, role: str = "client", watch: bool = False, address: str | None = None) -> bool:
    """Make ``sock`` (a DEALER, before it connects to ``address``) a CURVE client with this
    process's key pair and the broker's public key from the keys directory :func:`keys_dir`
    gives for that address; returns False, changing nothing, when it takes none. ``watch``:
    also record the handshake's failures from now on (with or without keys) so that
    :func:`poll` can say why a broker does not answer. A watched socket holds a monitor socket
    until :func:`poll` or :func:`unwatch` ends the watch, which must happen before its context
    is terminated."""
    root = keys_dir(address)
    if root is not None:
        server = broker_public(root)
        public, secret, path = own_pair(root, role)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server
        _roles[sock] = (role, path[: -len("_secret")], public.decode(errors="replace"), explicit_dir() is None)
    if watch:
        _watch(sock)
    return root is not None


def _watch(sock):
    mon = _monitors.get(sock)
    if mon is None:
        addr = f"inproc://fabric-handshake-{os.getpid()}-{next(_seq)}"
        sock.monitor(addr, _HANDSHAKE_FAILED)
        mon = sock.context.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        mon.connect(addr)
        _monitors[sock] = mon
    return mon


def unwatch(sock):
    """End the watch of ``sock`` (if any): stop its monitor and close the monitor socket."""
    mon = _monitors.pop(sock, None)
    if mon is None:
        return
    try:
        sock.monitor(None, 0)
    except zmq.ZMQError:
        pass  # the socket is closed already
    mon.close(0)


def send_first(sock, parts) -> bool:
    """Send a connection's first message without blocking. A DEALER whose handshake the broker
    refused before this send has no peer left to queue the message for, and a blocking send
    would then wait forever; False in that case, and :func:`poll` says why."""
    try:
        sock.send_multipart(parts, zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


def poll(sock, timeout: float) -> bool:
    """``sock.poll`` for up to ``timeout`` seconds that also watches the connection's handshake:
    True when a message is ready; False on timeout, or at once when the broker refused the
    handshake (then :func:`refusal` says why). Ends the watch either way."""
    from zmq.utils.monitor import recv_monitor_message

    mon = _watch(sock)
    deadline = time.monotonic() + timeout
    failures = 0
    try:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            events = dict(poller.poll(max(0, int(left * 1000))))
            if sock in events:
                return True
            if mon in events:
                while True:
                    try:
                        ev = recv_monitor_message(mon, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    failures += 1
                    # a refused key or a mechanism mismatch is final; a bare failure (a wrong
                    # broker key looks like this) is taken as final when it repeats
                    if ev["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL or failures >= 3:
                        _refusals[sock] = _explain(sock, ev)
                        return False
            if left <= 0:
                return False
    finally:
        unwatch(sock)


def refusal(sock) -> ConnectionFailed | None:
    """Why the broker refused ``sock``'s handshake (seen by :func:`poll`), or None."""
    return _refusals.get(sock)


def raise_if_refused(sock):
    e = refusal(sock)
    if e is not None:
        raise e


def _explain(sock, ev) -> ConnectionFailed:
    where = ev.get("endpoint", b"")
    where = where.decode(errors="replace") if isinstance(where, bytes) else str(where)
    where = where or "the broker"
    if sock in _roles:
        role, key_file, public, own = _roles[sock]
        if own and ev["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            # this user's default keys, and a broker they do not open: not this user's cluster
            return ConnectionFailed(
                f"the broker at {where} requires CurveZMQ keys and did not accept this user's ({key_file}, public "
                f"key {public}): it is not a cluster this user started (another user's, one started with other "
                f"keys, or one running without keys: {ENV}=none). To be let in, give its owner a copy of your public key file {key_file} and ask them to "
                f"allow-list it: `fabric keys add-{role} NAME --public-key {os.path.basename(key_file)}`; they also "
                f"give you their broker.key (or a whole keys directory made with `fabric keys add-{role} NAME --out "
                f"DIR`), which you use with {ENV}=DIR (docs/security.md)")
        if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return ConnectionFailed(
                f"the broker at {where} did not accept this process's key (public key {public}, {key_file}): "
                f"it is not in the broker's allow-list. On the broker's host, allow it with "
                f"`fabric keys add-{role} NAME --public-key {os.path.basename(key_file)}` (that file copied there), "
                f"or make an allowed pair with `fabric keys add-{role} NAME` and use it here ({ENV})")
        return ConnectionFailed(
            f"the CurveZMQ handshake with {where} failed: check that {os.path.dirname(key_file)}/broker.key is that "
            f"broker's public key, and that the broker runs with keys ({ENV} or `fabric start --keys DIR`)")
    return ConnectionFailed(
        f"the handshake with {where} failed: if it is a fabric broker, it requires CurveZMQ keys. Set {ENV} to a "
        f"keys directory holding its broker.key and an allow-listed key pair (see `fabric keys --help`)")
