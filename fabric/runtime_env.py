"""Runtime environments (Ray's ``runtime_env``): what a function's or class's code needs around
it on the executor: ``env_vars``, a ``working_dir`` shipped from the driver, ``pip`` packages.

    @fabric.fn(runtime_env={"env_vars": {"MODE": "fast"}, "working_dir": ".", "pip": ["pkg==1.2"]})

This module is the driver's half and is pure apart from reading the working_dir it packages:
:func:`validate` checks what the user gave (``TypeError``/``ValueError`` naming the key),
:func:`merge` lays a function's env over the job's (``fabric.init(runtime_env=...)``),
:func:`package` zips a working_dir by content hash, and :class:`EnvCall` is what travels in
the code frame in place of the user's function or class: the resolved env (hashes and store
keys, never local paths of the driver) and the user's pickled code, unpickled on the worker
only once the env is in place (so a module of the working_dir or of a pip package that the
code refers to by name imports there). The executor's half is ``fabric.executor.runtime_env``.

Because the env travels inside the code frame, its hash is part of the code hash: the broker
stays payload-blind and needs no new message field, and two envs of one function are two
functions to it (queues, caps, warm containers).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import stat
import zipfile

from .errors import RuntimeEnvError

KEYS = ("env_vars", "working_dir", "pip", "excludes")
# never packaged: version control, caches, virtual environments (a folder with pyvenv.cfg too)
DEFAULT_EXCLUDES = (".git", ".hg", ".svn", "__pycache__", "*.pyc", ".venv", "venv", ".tox", ".mypy_cache",
                    ".pytest_cache", ".ruff_cache", "node_modules", ".ipynb_checkpoints")
DEFAULT_LIMIT = 100 << 20   # bytes of files a working_dir may hold (FABRIC_WORKING_DIR_LIMIT)
STORE_PREFIX = "runtime_env/working_dir"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so one content gives one zip
# in a worker, while a call with an env runs (for an instance: for its life), that env, resolved:
# the calls it submits inherit it, as in Ray (set by fabric.executor.runtime_env)
current: dict | None = None


def validate(where: str, env) -> dict:
    """``env`` checked and normalised: a dict with only the keys given (``working_dir`` an
    absolute path of a folder that exists, ``pip`` a list of strings). ``None`` -> ``{}``.
    A key set to ``None`` stays, as ``None``: it unsets the job's value in :func:`merge`."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise TypeError(f"{where}: runtime_env must be a dict (keys {', '.join(KEYS)}), got {type(env).__name__}")
    unknown = sorted(str(k) for k in env if k not in KEYS)
    if unknown:
        raise TypeError(f"{where}: runtime_env got unknown key(s) {', '.join(unknown)}; valid keys: "
                        f"{', '.join(KEYS)} (conda, container and py_modules are not supported)")
    out: dict = {}
    if "env_vars" in env:
        ev = env["env_vars"]
        if ev is not None:
            if not isinstance(ev, dict):
                raise TypeError(f"{where}: runtime_env['env_vars'] must be a dict of str to str, got "
                                f"{type(ev).__name__}")
            for k, v in ev.items():
                if not isinstance(k, str) or not k or "=" in k or "\0" in k:
                    raise ValueError(f"{where}: runtime_env['env_vars'] has an invalid variable name {k!r}")
                if not isinstance(v, str) or "\0" in v:
                    raise TypeError(f"{where}: runtime_env['env_vars'][{k!r}] must be a string, got "
                                    f"{type(v).__name__} {v!r} (write str({v!r}))")
            ev = dict(ev)
        out["env_vars"] = ev
    if "working_dir" in env:
        wd = env["working_dir"]
        if wd is not None:
            if not isinstance(wd, (str, os.PathLike)):
                raise TypeError(f"{where}: runtime_env['working_dir'] must be a local folder's path, got "
                                f"{type(wd).__name__}")
            path = os.path.abspath(os.fspath(wd))
            if not os.path.isdir(path):
                what = "is not a folder" if os.path.exists(path) else "does not exist"
                raise ValueError(f"{where}: runtime_env['working_dir'] {os.fspath(wd)!r} {what} ({path})")
            wd = path
        out["working_dir"] = wd
    if "pip" in env:
        reqs = env["pip"]
        if reqs is not None:
            if isinstance(reqs, str):
                raise TypeError(f"{where}: runtime_env['pip'] must be a list of requirements, like "
                                f"[{reqs!r}], not a string")
            if not isinstance(reqs, (list, tuple)):
                raise TypeError(f"{where}: runtime_env['pip'] must be a list of requirement strings, got "
                                f"{type(reqs).__name__}")
            for r in reqs:
                if not isinstance(r, str) or not r.strip() or "\0" in r or "\n" in r:
                    raise ValueError(f"{where}: runtime_env['pip'] holds {r!r}: each item must be one "
                                     f"requirement, like 'pkg==1.2' or a path to a local package")
            reqs = [r.strip() for r in reqs]
        out["pip"] = reqs
    if "excludes" in env:
        ex = env["excludes"]
        if ex is not None:
            if isinstance(ex, str) or not isinstance(ex, (list, tuple)) or not all(isinstance(p, str) for p in ex):
                raise TypeError(f"{where}: runtime_env['excludes'] must be a list of glob patterns "
                                f"(like ['data/', '*.bin']), got {ex!r}")
            ex = list(ex)
        out["excludes"] = ex
    return out


def merge(job: dict | None, fn: dict | None) -> dict:
    """A function's (or class's) env over the job's, as in Ray: ``env_vars`` merge key by key
    (the function's win), other keys of the function replace the job's; a key the function sets
    to ``None`` drops the job's. Both are :func:`validate` outputs; so is the result (no None)."""
    job, fn = job or {}, fn or {}
    out = {k: v for k, v in job.items() if v is not None}
    for k, v in fn.items():
        if v is None:
            out.pop(k, None)
        elif k == "env_vars":
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return {k: v for k, v in out.items() if v not in (None, {}, [])} if out else {}


def digest(obj) -> str:
    """A stable hex hash of a JSON-able value (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def pip_hash(reqs: list[str]) -> str:
    """The key of a requirement set's cached install: its items, in the order given (pip
    resolves them together, so the set is the unit)."""
    return digest(["pip", list(reqs)])


def _excluded(rel: str, name: str, patterns) -> bool:
    for p in patterns:
        q = p.rstrip("/")
        if fnmatch.fnmatch(name, q) or fnmatch.fnmatch(rel, q) or rel.startswith(q + "/"):
            return True
    return False


def walk(root: str, excludes=()) -> list[tuple[str, str, int]]:
    """The files of a working_dir to ship, as (relative path, full path, size), sorted: the
    default excludes and ``excludes`` (globs on names or relative paths) left out, and every
    folder holding a ``pyvenv.cfg`` (a virtual environment). Links are followed to files only."""
    patterns = list(DEFAULT_EXCLUDES) + list(excludes or ())
    out = []
    for d, dirs, files in os.walk(root):
        reld = os.path.relpath(d, root)
        reld = "" if reld == "." else reld.replace(os.sep, "/") + "/"
        keep = []
        for name in sorted(dirs):
            full = os.path.join(d, name)
            if _excluded(reld + name, name, patterns) or os.path.exists(os.path.join(full, "pyvenv.cfg")) \
                    or os.path.islink(full):
                continue
            keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            rel = reld + name
            full = os.path.join(d, name)
            if _excluded(rel, name, patterns):
                continue
            try:
                st = os.stat(full)
            except OSError:
                continue  # a dangling link, or gone meanwhile
            if stat.S_ISREG(st.st_mode):
                out.append((rel, full, st.st_size))
    return sorted(out)


def package(root: str, excludes=(), limit: int = DEFAULT_LIMIT) -> tuple[bytes, str]:
    """(zip of the working_dir ``root``, its content hash). Entries are sorted and timestamped
    alike, so the same files give the same bytes and hash wherever they are packaged. Over
    ``limit`` bytes of files, a ``RuntimeEnvError`` names the largest ones and what to do."""
    files = walk(root, excludes)
    total = sum(size for _, _, size in files)
    if total > limit:
        big = sorted(files, key=lambda f: -f[2])[:5]
        names = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for rel, _, size in big)
        raise RuntimeEnvError(
            f"runtime_env['working_dir'] {root} holds {total / 2**20:.1f} MiB of files, more than the limit of "
            f"{limit / 2**20:.1f} MiB (FABRIC_WORKING_DIR_LIMIT); the largest: {names}. Leave them out with "
            f"runtime_env={{'excludes': [...]}}, or put data in fabric.storage and read it from there")
    buf = io.BytesIO()
    h = hashlib.blake2b(digest_size=16)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, full, _ in files:
            with open(full, "rb") as f:
                data = f.read()
            mode = os.stat(full).st_mode & 0o777
            info = zipfile.ZipInfo(rel, _ZIP_TIME)
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            h.update(rel.encode() + b"\0" + oct(mode).encode() + b"\0" + len(data).to_bytes(8, "big"))
            h.update(data)
    return buf.getvalue(), h.hexdigest()


def store_key(wd_hash: str) -> str:
    return f"{STORE_PREFIX}/{wd_hash}.zip"


def limit() -> int:
    """The most bytes a working_dir may hold: ``FABRIC_WORKING_DIR_LIMIT``, else 100 MiB."""
    from . import settings
    from .resources import parse_memory

    raw = settings.get().working_dir_limit
    return parse_memory(raw) if raw else DEFAULT_LIMIT


_shipped: dict = {}  # (folder, excludes, store) -> (listing's digest, content hash): zipped once per content


def resolve(env: dict) -> dict:
    """What travels for a merged, validated env: the working_dir packaged and put in the
    cluster's store (once per content: a folder whose file list, sizes and times did not change
    is not read again), in place of its local path."""
    out = {k: env[k] for k in ("env_vars", "pip") if env.get(k)}
    wd = env.get("working_dir")
    if isinstance(wd, dict):  # inherited from the call this one is nested in: shipped already
        out["working_dir"] = wd
    elif wd:
        from . import storage

        if not os.path.isdir(wd):
            raise ValueError(f"runtime_env['working_dir'] {wd} no longer exists (it did when the function or "
                             f"class was decorated)")
        excludes = tuple(env.get("excludes") or ())
        store = storage.default()
        where = (wd, excludes, store.display)
        listing = digest([(rel, size, os.stat(full).st_mtime_ns) for rel, full, size in walk(wd, excludes)])
        seen = _shipped.get(where)
        if seen is not None and seen[0] == listing:
            h = seen[1]
        else:
            data, h = package(wd, excludes, limit())
            if not store.exists(store_key(h)):
                store.put_bytes(store_key(h), data)
            _shipped[where] = (listing, h)
        out["working_dir"] = {"hash": h, "key": store_key(h), "store": store.display}
    return out


class EnvCall:
    """Stands, in the code frame, for a function or class that has a runtime_env. ``env`` is
    resolved (``env_vars``, ``working_dir``: ``{"hash", "key", "store"}``, ``pip``); ``code``
    is the user's code frame (``serde.code_blob``), unpickled on the worker inside the env.
    ``kind``: "function", "generator", "async", "asyncgen" or "class" (how the call is wrapped)."""

    def __init__(self, env: dict, code: bytes, name: str, qualname: str, module: str, kind: str):
        self.env, self.code, self.kind = env, code, kind
        self.__name__, self.__qualname__, self.__module__ = name, qualname, module
        self.loaded: object = None            # on the worker: the user's code, once unpickled
        self.failed: Exception | None = None  # on the worker: why the env could not be set up
        self.setup: object = None             # on the worker: the env made ready (executor.runtime_env.Setup)

    def __reduce__(self):
        return EnvCall, (self.env, self.code, self.__name__, self.__qualname__, self.__module__, self.kind)

    def __call__(self, *args, **kwargs):
        from .executor import runtime_env

        return runtime_env.call(self, args, kwargs)

    def __repr__(self):
        return f"<{self.__qualname__} in runtime_env {digest(self.env)[:8]}>"
