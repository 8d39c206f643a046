"""Whole directories (checkpoints) as one atomic object.

An object store has no atomic multi-file write, so a directory is written in two steps: its
files go under a fresh version prefix ``KEY/.fabric-v<version>/``, then a small manifest
``KEY/.fabric-dir`` naming that version is written atomically. Readers go through the
manifest, so they see the old checkpoint or the new one, never a mix. The version the
manifest named before is deleted once the new one is published; a reader still fetching it
rereads the manifest and starts over.
"""
from __future__ import annotations

import json
import os
import time
import uuid

from .. import config
from .store import DIR_MANIFEST, INTERNAL, KeyNotFound, StorageError, Store

_VERSION = INTERNAL + "v"
_FORMAT = 1


def _owner_only(top: str) -> None:
    """Folders 0700 and files 0600 under ``top`` (what fsspec's copy made under the umask)."""
    for here, _, names in os.walk(top):
        os.chmod(here, 0o700)
        for name in names:
            os.chmod(os.path.join(here, name), 0o600)


def put_dir(store: Store, key: str, local_dir: str | os.PathLike) -> None:
    local_dir = os.path.abspath(os.fspath(local_dir))
    if not os.path.isdir(local_dir):
        raise NotADirectoryError(f"put_dir needs a local directory, and {local_dir!r} is not one")
    files, dirs = {}, []
    for here, subdirs, names in os.walk(local_dir):
        rel_here = os.path.relpath(here, local_dir)
        for d in subdirs:
            dirs.append(_rel(rel_here, d))
        for name in names:
            files[_rel(rel_here, name)] = os.path.getsize(os.path.join(here, name))

    path = store._path(key)
    previous = _manifest(store, key, missing_ok=True)
    version = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
    prefix = f"{path}/{_VERSION}{version}"
    with store._errors(key, writing=True):
        if store._local:  # owner-only, whatever the umask: the version's folder first, then its files
            config.private_dir(prefix)
        if files:
            rels = sorted(files)
            store.fs.put([os.path.join(local_dir, *r.split("/")) for r in rels],
                         [f"{prefix}/{r}" for r in rels])
        if store._local:
            _owner_only(prefix)
    manifest = {"format": _FORMAT, "version": version, "files": files, "dirs": sorted(dirs)}
    store._write_bytes(f"{path}/{DIR_MANIFEST}", json.dumps(manifest).encode(), key)
    if previous and previous["version"] != version:
        with store._errors(key):
            try:
                store.fs.rm(f"{path}/{_VERSION}{previous['version']}", recursive=True)
            except FileNotFoundError:
                pass
            store._fresh(path)


def get_dir(store: Store, key: str, local_dir: str | os.PathLike, attempts: int = 5) -> str:
    local_dir = os.path.abspath(os.fspath(local_dir))
    path = store._path(key)
    for attempt in range(attempts):
        manifest = _manifest(store, key)
        prefix = f"{path}/{_VERSION}{manifest['version']}"
        os.makedirs(local_dir, exist_ok=True)
        for d in manifest["dirs"]:
            os.makedirs(os.path.join(local_dir, *d.split("/")), exist_ok=True)
        rels = sorted(manifest["files"])
        lpaths = [os.path.join(local_dir, *r.split("/")) for r in rels]
        for lp in lpaths:
            os.makedirs(os.path.dirname(lp), exist_ok=True)
        with store._errors(key):
            try:
                if rels:
                    store.fs.get([f"{prefix}/{r}" for r in rels], lpaths)
                return local_dir
            except FileNotFoundError:  # a newer put_dir replaced this version: start over
                time.sleep(0.01 * 2**attempt)
    raise StorageError(f"directory {key!r} of store {store._display} was replaced {attempts} "
                       f"times while it was being read; try again")


def _manifest(store: Store, key: str, missing_ok: bool = False):
    try:
        manifest = store._read_json(store._path(f"{key}/{DIR_MANIFEST}"), key)
    except KeyNotFound:
        if missing_ok:
            return None
        hint = ""
        try:
            if store.fs.isfile(store._path(key)):
                hint = "it holds a single object; read it with get/get_bytes"
        except Exception:
            pass
        raise KeyNotFound(key, store._display, hint) from None
    if manifest.get("format") != _FORMAT:
        raise StorageError(f"directory {key!r} was written by a newer fabric (format "
                         f"{manifest.get('format')!r}); upgrade fabric to read it")
    return manifest


def _rel(here: str, name: str) -> str:
    rel = name if here == "." else os.path.join(here, name)
    return rel.replace(os.sep, "/")
