"""The executor's half of runtime environments: set up a call's ``runtime_env`` in the worker
that runs it (the driver's half, and what travels, is ``fabric.runtime_env``).

Design: the env is *applied and restored around each call* in the ordinary, reused workers,
not given workers of its own. Env vars, the working folder, ``sys.path`` and the modules the
env's folders provide are set just before the call and put back right after it, so the next
call on that worker (another function, or none) sees the worker as it was. Why: the broker
routes on resource shapes and stays blind to code, so per-env workers would need a new routing
key in the broker and a process start (seconds of imports on a small host) at every new env;
applied envs keep warm workers shared and need no broker change. A pool worker runs one plain
call at a time on its main thread, so nothing else observes the env while it is set. A
``@fabric.cls`` instance owns its worker for life: its env is applied once, when the instance is
created, and kept (its concurrent method calls all share it).

- ``working_dir``: fetched once per host from the cluster's store (``fabric.storage.default()``,
  which works across hosts) under its content hash, unpacked into
  ``<cache>/working_dir/<hash>``, put first on ``sys.path`` and made the current folder.
- ``pip``: installed with ``pip install --target`` into ``<cache>/pip/<hash of the requirement
  set>`` and put first on ``sys.path`` (ahead of the working_dir). ``--target`` rather than a venv
  because a reused worker cannot switch interpreters: a folder on ``sys.path`` is what a running
  process can take up and drop between calls; fabric and its dependencies stay importable since
  the worker's own site-packages stay on the path behind it. pip's output streams to the
  driver's log; a failed install raises ``RuntimeEnvSetupError`` with pip's last lines.
- Modules: while a call runs, modules whose top-level name the env's folders provide come from
  there (a module of that name the worker had already imported, from elsewhere, steps aside for
  the call); after it, they are kept aside for the env's next call, so two envs with two
  versions of a package each see their own. fabric itself and the standard library never step
  aside. A compiled extension cannot be unloaded: two versions of one in one worker collide, as
  they would in any Python process.

A folder is made at most once per host: a file lock serialises concurrent first calls (the
others wait, then find it made), and a folder appears under its final name only when complete.
Each host keeps the ``FABRIC_RUNTIME_ENV_KEEP`` most recently used working dirs and as many pip
installs; making one more removes the least recently used, except those a call is running in
(it holds the folder's lock shared; an instance, for its life). A worker whose folder was
removed between two calls makes it again.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections import deque

from .. import config
from .. import settings
from ..errors import RuntimeEnvSetupError
from ..serde.code import load_code
from .. import runtime_env as _driver_half
from ..runtime_env import EnvCall, pip_hash

PIP_TAIL = 25  # lines of pip's output the error quotes
_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep


def cache_root() -> str:
    """This host's folder of unpacked working dirs and pip installs."""
    s = settings.get()
    if s.runtime_env_dir:
        return s.runtime_env_dir
    if s.home:
        return os.path.join(s.home, "cache", "runtime_env")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fabric", "runtime_env")


@contextlib.contextmanager
def _locked(final: str, what: str):
    """Hold the lock of the folder ``final`` is to be (a file beside it) for as long as it is made."""
    config.private_dir(os.path.dirname(final))
    fd = os.open(final + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[runtime_env] waiting for another worker on this host to finish {what}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _touch(final: str) -> None:
    try:
        os.utime(final + ".lock")  # its lock file's time: when the folder was last used
    except OSError:
        pass


def _evict(folder: str, keep: int) -> None:
    """Remove the least recently used folders of ``folder`` beyond ``keep`` that no call holds,
    and what installers that died left half made."""
    entries = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if ".tmp-" in name:
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not config.pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
            continue
        if name.endswith(".lock"):
            continue
        try:
            used = os.stat(path + ".lock").st_mtime
        except OSError:
            used = 0.0
        entries.append((used, path))
    entries.sort(reverse=True)
    for _, path in entries[keep:]:
        fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a call runs in it
            gone = f"{path}.tmp-gone-{os.getpid()}"
            try:
                os.rename(path, gone)
            except OSError:
                continue
            shutil.rmtree(gone, ignore_errors=True)
            os.unlink(path + ".lock")  # (a process that opens it later locks a new file: no folder to share)
        finally:
            os.close(fd)


def _made(final: str) -> None:
    """``final`` was just made: note its use, and keep the cache to its bound."""
    _touch(final)
    try:
        _evict(os.path.dirname(final), max(1, settings.get().runtime_env_keep))
    except OSError:
        pass  # a bound kept late is no reason to fail the call


def working_dir(wd: dict) -> str:
    """The local folder of a shipped working_dir (``{"hash", "key", "store"}``), unpacked on first use."""
    final = os.path.join(cache_root(), "working_dir", wd["hash"])
    if os.path.isdir(final):
        return final
    with _locked(final, f"unpacking working_dir {wd['hash'][:12]}"):
        if os.path.isdir(final):
            return final
        from .. import storage

        store = storage.default()
        data: bytes | None
        try:
            data = store.get_bytes(wd["key"])
        except KeyError:
            data = _from_drivers_store(wd)
        if data is None:
            raise RuntimeEnvSetupError(
                f"the runtime_env's working_dir {wd['key']} is not in this executor's store {store.display}; "
                f"the driver wrote it to {wd['store']}: give the driver and the cluster's processes the same "
                f"store (FABRIC_STORE)") from None
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o700)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                path = z.extract(info, tmp)  # (zipfile keeps names inside tmp)
                mode = (info.external_attr >> 16) & 0o777
                if mode and not info.is_dir():
                    os.chmod(path, mode)
        os.rename(tmp, final)
        _made(final)
    return final


def _from_drivers_store(wd: dict) -> bytes | None:
    """The zip from the store the driver named, when it is not this process's default (a driver
    that passed ``fabric.init(store=...)`` to an embedded cluster) and its URL is whole (no
    credentials were masked in it; the worker's own ambient credentials apply)."""
    from .. import storage

    url = wd.get("store") or ""
    if not url or "***" in url or url.startswith("memory:") or url == storage.default().display:
        return None
    try:
        return storage.Store(url).get_bytes(wd["key"])
    except (KeyError, storage.StorageError, OSError, ValueError):
        return None


def _own_copies(reqs: list[str], cwd: str | None, src: str) -> list[str]:
    """``reqs`` with each local source folder replaced by a private copy under ``src``: pip builds
    a folder in place (its ``build/``), so two executors of one host with caches of their own,
    installing the same folder at once, corrupt each other's wheel (one came out without its
    module). Other requirements pass as they are."""
    out = []
    for i, r in enumerate(reqs):
        path = os.path.join(cwd or os.getcwd(), r)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "pyproject.toml")) or \
                os.path.isdir(path) and os.path.exists(os.path.join(path, "setup.py")):
            copy = os.path.join(src, str(i), os.path.basename(os.path.normpath(path)))
            shutil.copytree(path, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".git"))
            out.append(copy)
        else:
            out.append(r)
    return out


def pip_target(reqs: list[str], cwd: str | None) -> str:
    """The folder where ``reqs`` are installed (``pip install --target``), installing them on first use."""
    final = os.path.join(cache_root(), "pip", pip_hash(reqs))
    if os.path.isdir(final):
        return final
    with _locked(final, f"pip install {' '.join(reqs)}"):
        if os.path.isdir(final):
            return final
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        src = f"{final}.tmp-src-{os.getpid()}"
        args = _own_copies(reqs, cwd, src)
        cmd = [sys.executable, "-m", "pip", "install", "--target", tmp, "--no-input",
               "--disable-pip-version-check", "--no-warn-script-location", "--", *args]
        print(f"[runtime_env] pip install {' '.join(reqs)}", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        tail: deque = deque(maxlen=PIP_TAIL)
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=cwd, env=env, text=True, errors="replace")
        except OSError as e:
            raise RuntimeEnvSetupError(f"runtime_env pip: could not start pip ({e})") from None
        assert p.stdout is not None
        for line in p.stdout:  # streamed: the driver sees the install as it goes
            line = line.rstrip("\n")
            tail.append(line)
            print(f"[pip] {line}", flush=True)
        rc = p.wait()
        shutil.rmtree(src, ignore_errors=True)
        if rc != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            text = "\n".join(tail)
            named = [r for r in reqs if r in text] or reqs
            raise RuntimeEnvSetupError(
                f"runtime_env pip install failed (exit {rc}) for {', '.join(repr(r) for r in named)}; "
                f"pip's last lines:\n{text}")
        os.makedirs(tmp, exist_ok=True)  # (an empty requirement set makes nothing)
        os.rename(tmp, final)
        _made(final)
    return final


class Setup:
    """An env made ready on this worker: what to set around each call, and the modules it owns."""

    def __init__(self, env: dict):
        self.env = env  # resolved: what calls submitted from inside inherit
        self.env_vars = dict(env.get("env_vars") or {})
        self.cwd = working_dir(env["working_dir"]) if env.get("working_dir") else None
        pip = pip_target(env["pip"], self.cwd) if env.get("pip") else None
        self.paths = [p for p in (pip, self.cwd) if p]
        self.tops = {n for p in self.paths for n in _top_names(p)}
        self.modules: dict = {}  # this env's modules between its calls
        self.locks = [os.open(p + ".lock", os.O_CREAT | os.O_RDWR, 0o600) for p in self.paths]

    def hold(self) -> bool:
        """Hold the folders for a call (their locks, shared: not removed meanwhile); False, and
        nothing held, when one was removed since this Setup was made."""
        for fd in self.locks:
            fcntl.flock(fd, fcntl.LOCK_SH)
        if all(os.path.isdir(p) for p in self.paths):
            for p in self.paths:
                _touch(p)
            return True
        self.release()
        return False

    def release(self) -> None:
        for fd in self.locks:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self.locks:
            os.close(fd)
        self.locks = []


def _top_names(folder: str) -> set[str]:
    out = set()
    for name in os.listdir(folder):
        if name.endswith((".dist-info", ".egg-info", ".pth")) or name in ("bin", "__pycache__") or name.startswith("."):
            continue
        base = name.split(".", 1)[0] if not os.path.isdir(os.path.join(folder, name)) else name
        if base.isidentifier() and base != "fabric":
            out.add(base)
    return out


def _movable(mod) -> bool:
    f = getattr(mod, "__file__", None)
    if f is None:  # a namespace package moves; a built-in module does not
        return getattr(mod, "__path__", None) is not None
    return _outside_stdlib(f)


@functools.lru_cache(maxsize=4096)
def _outside_stdlib(path: str) -> bool:
    f = os.path.realpath(path)
    return not f.startswith(_STDLIB) or "site-packages" in f or "dist-packages" in f


def _take(tops) -> dict:
    """Remove from ``sys.modules`` (and return) the modules under the top-level names ``tops``
    (the standard library's stay)."""
    present = [t for t in tops if t in sys.modules]  # a submodule is never there without its package
    if not present:
        return {}
    prefixes = tuple(t + "." for t in present)
    taken = {}
    for name in present + [n for n in sys.modules if n.startswith(prefixes)]:
        if _movable(sys.modules[name]):
            taken[name] = sys.modules.pop(name)
    return taken


@contextlib.contextmanager
def applied(s: Setup, restore: bool = True):
    """Set ``s`` up in this process; with ``restore``, put everything back afterwards."""
    old_env = {k: os.environ.get(k) for k in s.env_vars}
    old_cwd = os.getcwd() if s.cwd else None
    old_path = list(sys.path)
    os.environ.update(s.env_vars)
    if s.cwd:
        os.chdir(s.cwd)
    sys.path[:0] = s.paths
    outer, _driver_half.current = _driver_half.current, s.env
    aside = _take(s.tops) if s.tops else {}
    sys.modules.update(s.modules)
    count = len(sys.modules)
    try:
        yield
    finally:
        if restore:
            s.release()
            if s.tops:
                if len(sys.modules) == count and all(n in sys.modules for n in s.modules):
                    # nothing imported or dropped: the env's modules are the ones it came with
                    # (no walk over sys.modules, which costs ~1 us per 5 modules)
                    s.modules = {n: sys.modules.pop(n) for n in s.modules}
                else:
                    s.modules = _take(s.tops)
                sys.modules.update(aside)
            sys.path[:] = old_path
            _driver_half.current = outer
            if old_cwd is not None:
                try:
                    os.chdir(old_cwd)
                except OSError:
                    pass
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _ready(ec: EnvCall) -> Setup:
    """``ec``'s env made ready on this worker (once) and held for a call (``applied`` lets it
    go), or the error it failed with."""
    if ec.failed is not None:
        raise RuntimeEnvSetupError(str(ec.failed))
    setup = ec.setup
    if isinstance(setup, Setup):
        if setup.hold():
            return setup
        setup.close()  # its folders were removed (the host's cache bound): make them again
    for _ in range(3):
        try:
            setup = ec.setup = Setup(ec.env)
        except RuntimeEnvSetupError as e:
            ec.failed = e  # remembered: each call of this env on this worker says the same, at once
            raise
        except OSError as e:
            raise RuntimeEnvSetupError(f"runtime_env could not be set up on this executor: {e}") from e
        if setup.hold():
            return setup
        setup.close()  # removed again as it was made, by other workers' new envs
    raise RuntimeEnvSetupError("runtime_env: its folders were removed as soon as they were made: the host's "
                               "cache keeps too few for the envs in use (raise FABRIC_RUNTIME_ENV_KEEP)")


def _code(ec: EnvCall):
    if ec.loaded is None:
        ec.loaded = load_code(ec.code)  # inside the env: its modules import from its folders
    return ec.loaded


def call(ec: EnvCall, args: tuple, kwargs: dict):
    """Run ``ec``'s function (or build its class's instance) with its env in place."""
    kind = ec.kind
    if kind == "class":  # the instance owns this worker: the env (and its folders) stay for its life
        with applied(_ready(ec), restore=False):
            return _code(ec)(*args, **kwargs)
    if kind == "generator":
        return _generator(ec, args, kwargs)
    if kind == "asyncgen":
        return _async_generator(ec, args, kwargs)
    if kind == "async":
        return _coroutine(ec, args, kwargs)
    with applied(_ready(ec)):
        return _code(ec)(*args, **kwargs)


def _generator(ec, args, kwargs):
    with applied(_ready(ec)):  # the worker runs a stream to its end before its next call
        yield from _code(ec)(*args, **kwargs)


async def _coroutine(ec, args, kwargs):
    with applied(_ready(ec)):
        return await _code(ec)(*args, **kwargs)


async def _async_generator(ec, args, kwargs):
    with applied(_ready(ec)):
        async for item in _code(ec)(*args, **kwargs):
            yield item
