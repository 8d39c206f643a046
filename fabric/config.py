"""Where fabric keeps its files, and the environment variables it reads.

    FABRIC_ADDRESS   the broker a driver connects to (else an embedded cluster is started)
    FABRIC_HOME      fabric's data folder (default: $XDG_DATA_HOME/fabric or ~/.local/share/fabric)
    FABRIC_STORE     the object store URL (see fabric.storage)
"""
from __future__ import annotations

import os
import time


def data_dir() -> str:
    home = os.environ.get("FABRIC_HOME")
    if not home:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        home = os.path.join(base, "fabric")
    os.makedirs(home, exist_ok=True)
    return home


def new_log_dir(kind: str = "session") -> str:
    d = os.path.join(data_dir(), "logs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    return d


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


def remove_shm(pid: int, directory: str = "/dev/shm") -> None:
    """Remove the shared-memory files of driver ``pid`` (named ``fabric-<pid>-<random>``)."""
    import glob

    for path in glob.glob(os.path.join(directory, f"fabric-{pid}-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


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
