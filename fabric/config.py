"""Where fabric keeps its files. The environment variables fabric reads are in
:mod:`fabric.settings` (and docs/settings.md).

Everything fabric writes is owner-only whatever the umask (docs/security.md): its folders
0700, its files 0600. The user's driver keeps its umask (it is the user's process), so fabric
creates things there with explicit modes (:func:`private_dir`, :func:`private_open`); fabric's
own processes (broker, executors, workers, autoscaler, the ``fabric`` command) run under
:data:`UMASK` (:func:`private_umask`).
"""
from __future__ import annotations

import os
import time

from . import settings

UMASK = 0o077


USER_UMASK = "FABRIC_USER_UMASK"  # the user's umask (octal), for workers: user code keeps it


def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for a moment, in
    every thread of the user's process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(UMASK)
    os.umask(old)
    return old


def private_umask() -> None:
    """Make what this process creates owner-only: for fabric's own processes (broker, executor,
    autoscaler, the ``fabric`` command), at their start. The umask it had is kept in
    ``FABRIC_USER_UMASK`` for the workers, where user code runs under the user's own."""
    old = os.umask(UMASK)
    os.environ.setdefault(USER_UMASK, f"{old:o}")


def user_umask() -> None:
    """In a worker: back to the user's umask (``FABRIC_USER_UMASK``) for the user's code."""
    try:
        os.umask(int(settings.get().user_umask or "", 8))
    except ValueError:  # unset or not octal: keep fabric's
        pass


def private_dir(path: str) -> str:
    """``os.makedirs(path)`` where every folder it creates is 0700, whatever the umask. A folder
    that exists is left as it is (it may be the user's own: ``FABRIC_HOME=~/work``)."""
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue  # made by another process meanwhile
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask; chmod's is not
    return path


def private_open(path: str, mode: str = "ab"):
    """``open(path, mode)`` for a file fabric writes (a log, a record): made 0600 if new."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also an older, looser file of ours
    except OSError:
        pass
    return os.fdopen(fd, mode)


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "fabric")


def data_dir() -> str:
    """fabric's data folder, made 0700 on first use. The default one (not a FABRIC_HOME the
    user chose) is also tightened if an older fabric left it open to others."""
    home = settings.get().home
    if home:
        return private_dir(home)
    home = private_dir(_default_data_dir())
    try:
        st = os.stat(home)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(home, 0o700)
    except OSError:
        pass
    return home


def new_log_dir(kind: str = "session") -> str:
    d = os.path.join(data_dir(), "logs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    return private_dir(d)


def state_file() -> str:
    """Where ``fabric start --detach`` records the cluster it started."""
    return os.path.join(data_dir(), "cluster.json")


def is_local_address(address: str) -> bool:
    """True when the broker is on this host (ipc:// or loopback), so shared memory is usable."""
    if address.startswith("ipc://") or address.startswith("inproc://"):
        return True
    if address.startswith("tcp://"):
        host = address[6:].rsplit(":", 1)[0].strip("[]")
        return host in ("localhost", "::1") or host.startswith("127.")
    return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie counts as gone): how fabric's processes notice
    that the process they serve (a driver, an executor, `fabric start`) has died."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# Shared-memory mappings a worker keeps between calls (fabric.serde.shm), and so the arenas per
# host the broker has idle workers map ahead (fabric.broker.arenas): one value for both sides.
KEEP_MAPPINGS = 4


def remove_shm(pid: int, directory: str = "/dev/shm") -> None:
    """Remove the shared-memory files of driver ``pid`` (``fabric-<pid>-*``, made by
    ``fabric.serde.shm``): what the broker of an embedded cluster does when its driver has died,
    and the cluster when it stops. Here, not in serde, so the broker imports no serde at all."""
    import glob

    for path in glob.glob(os.path.join(directory, f"fabric-{pid}-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def quiet_gc(young: int = 20_000) -> None:
    """For fabric's own long-running processes (the broker, a worker), once their modules are
    loaded: move everything allocated so far out of the cyclic GC's sight (``gc.freeze``) and
    collect the youngest generation every ``young`` allocations, not every 700. Measured on the
    pipelined instance bench: the full collections, each a walk over every tracked object
    (the loaded modules included), were ~3 us of the broker's CPU per call. A call's own objects
    die young and are freed by reference counting either way; only cycles wait longer."""
    import gc

    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(young, g1, g2)
