"""``fabric.lookup(app, name, version=None)``: a deployed function or class by name, from any
client of the cluster.

The handle loads the version's bundle into a local cache (by content hash, owner-only) and
imports it, then calls go out as ordinary fabric calls. Without ``version=`` it follows the
app: each call checks the current-version pointer (a small read, at most every 0.5 s), so
after a redeploy every new call is served by the new version, and calls already made finish
on the old one.
"""
from __future__ import annotations

import os
import threading
import time

import fabric
from fabric import storage

from . import bundle
from .registry import AppError, Registry

_loaded: dict[tuple[str, int], object] = {}
_lock = threading.Lock()


def _cache_dir() -> str:
    from fabric import config

    return config.private_dir(os.path.join(config.data_dir(), "apps"))


def load_version(reg: Registry, man: dict):
    """The App object of one manifest (imported once per process and version)."""
    key = (man["app"], man["version"])
    with _lock:
        if key not in _loaded:
            d = os.path.join(_cache_dir(), man["bundle"])
            if not os.path.exists(os.path.join(d, man["entry"])):
                import shutil
                import tempfile

                tmp = bundle.unpack(reg.bundle(man["bundle"]), tempfile.mkdtemp(dir=_cache_dir()))
                try:
                    os.rename(tmp, d)  # another process may have unpacked the same bundle meanwhile
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
            mod = bundle.load_module(os.path.join(d, man["entry"]), f"fabric_app_{man['app']}_v{man['version']}"
                                     .replace("-", "_"))
            bundle.ship_by_value(d)  # workers have no copy of the bundle: its modules travel with the code
            from .app import App

            apps = [a for a in vars(mod).values() if isinstance(a, App)]
            app = next((a for a in apps if a.name == man["app"]), apps[0] if len(apps) == 1 else None)
            if app is None:
                raise AppError(f"version {man['version']} of app {man['app']!r} holds no App of that name")
            app.name = man["app"]
            _loaded[key] = app
        return _loaded[key]


class Handle:
    """What ``fabric.lookup`` returns: ``.remote(...)`` and ``.map(...)`` (a class: ``.remote()``
    makes an instance), following the app's current version unless one was pinned."""

    def __init__(self, app: str, name: str, version: int | None, store=None):
        self.app, self.name, self.pinned = app, name, version
        self._reg = Registry(store or storage.default())
        self._checked = 0.0
        self._version = None
        self._target = None
        self._resolve(force=True)

    def __repr__(self):
        return f"<fabric.lookup {self.app}.{self.name} v{self._version}>"

    @property
    def version(self) -> int:
        self._resolve()
        return self._version

    def _resolve(self, force=False):
        now = time.monotonic()
        if not force and (self.pinned is not None or now - self._checked < 0.5):
            return self._target
        self._checked = now
        man = self._reg.resolve(self.app, self.pinned)
        if man["version"] != self._version:
            app = load_version(self._reg, man)
            target = app.functions.get(self.name) or app.classes.get(self.name)
            if target is None:
                raise AppError(f"app {self.app!r} (version {man['version']}) has no function or class named "
                               f"{self.name!r}; it has: {', '.join(sorted([*app.functions, *app.classes])) or 'none'}")
            if target._options.get("min_warm"):
                # the app's warm containers are the reconciler's to keep (fabric.apps.warm): a
                # lookup's calls must not hold an old version's min_warm while this client lives
                target = target.options(min_warm=0)
            self._target, self._version = target, man["version"]
        return self._target

    def remote(self, *args, **kwargs):
        return self._resolve().remote(*args, **kwargs)

    def map(self, *iterables, **kw):
        return self._resolve().map(*iterables, **kw)

    def options(self, **kw):
        return self._resolve().options(**kw)


def lookup(app: str, name: str, version: int | None = None) -> Handle:
    """A deployed function or class of ``app`` by ``name`` (``version=`` pins one version)."""
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(f"version must be a whole number >= 1, got {version!r}")
    return Handle(app, name, version)
