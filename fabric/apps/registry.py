"""Apps' versions in the cluster's store: manifests, bundles and the current-version pointer.

Layout (keys in ``fabric.storage.default()``)::

    apps/<name>/versions/000001.json   one manifest per version (never rewritten)
    apps/<name>/current.json           {"version": N, "stopped": false, "updated_at": ...}
    apps/bundles/<hash>.zip            code bundles, shared between versions by content hash

Everything lives in the store, so it survives broker and reconciler restarts, and any client of
the cluster (same store) sees the same registry. A manifest's ``digest`` covers its code and
its objects' names and options: deploying an unchanged app finds the same digest and keeps
its version.
"""
from __future__ import annotations

import hashlib
import json
import time

from fabric import FabricError


class AppError(FabricError):
    """A deploy, lookup or rollback that cannot be done; the message says why and what exists."""


def _key(name: str, *parts: str) -> str:
    return "/".join(("apps", name) + parts)


def digest(manifest: dict) -> str:
    body = {k: manifest[k] for k in ("bundle", "entry", "functions", "classes", "deployments")}
    return hashlib.blake2b(json.dumps(body, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class Registry:
    def __init__(self, store):
        self.store = store

    def names(self) -> list[str]:
        try:
            keys = self.store.ls("apps")
        except (KeyError, FileNotFoundError):
            return []
        return sorted({k.split("/")[1] for k in keys if k.endswith("/current.json")})

    def current(self, name: str) -> dict | None:
        try:
            return json.loads(self.store.get_bytes(_key(name, "current.json")))
        except (KeyError, FileNotFoundError):
            return None

    def versions(self, name: str) -> list[int]:
        try:
            keys = self.store.ls(_key(name, "versions"))
        except (KeyError, FileNotFoundError):
            return []
        return sorted(int(k.rsplit("/", 1)[1].split(".")[0]) for k in keys if k.endswith(".json"))

    def manifest(self, name: str, version: int) -> dict:
        try:
            return json.loads(self.store.get_bytes(_key(name, "versions", f"{version:06d}.json")))
        except (KeyError, FileNotFoundError):
            have = self.versions(name)
            raise AppError(f"app {name!r} has no version {version}" +
                           (f"; its versions: {', '.join(map(str, have))}" if have else
                            f"; no app {name!r} was ever deployed (apps: {', '.join(self.names()) or 'none'})"))

    def bundle(self, h: str) -> bytes:
        return self.store.get_bytes(f"apps/bundles/{h}.zip")

    def put_bundle(self, h: str, data: bytes) -> None:
        if not self.store.exists(f"apps/bundles/{h}.zip"):
            self.store.put_bytes(f"apps/bundles/{h}.zip", data)

    def add_version(self, manifest: dict) -> int:
        """Write ``manifest`` as the next version and make it current; returns its number."""
        name = manifest["app"]
        v = (self.versions(name) or [0])[-1] + 1
        manifest = {**manifest, "version": v, "deployed_at": time.time(), "digest": digest(manifest)}
        self.store.put_bytes(_key(name, "versions", f"{v:06d}.json"), json.dumps(manifest, indent=1).encode())
        self.set_current(name, v)
        return v

    def set_current(self, name: str, version: int, stopped: bool = False) -> None:
        self.store.put_bytes(_key(name, "current.json"),
                             json.dumps({"version": version, "stopped": stopped, "updated_at": time.time()}).encode())

    def resolve(self, name: str, version: int | None = None) -> dict:
        """The manifest ``lookup`` uses: the given version, else the current one of a running app."""
        cur = self.current(name)
        if cur is None:
            raise AppError(f"no app named {name!r} is deployed on this cluster "
                           f"(apps: {', '.join(self.names()) or 'none'}); deploy one with `fabric deploy FILE`")
        if version is None:
            if cur.get("stopped"):
                raise AppError(f"app {name!r} is stopped (its last version was {cur['version']}); "
                               f"`fabric deploy` it again or `fabric app rollback {name}` to bring it back")
            version = cur["version"]
        return self.manifest(name, int(version))
