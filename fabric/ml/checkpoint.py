"""``Checkpoint``: a directory of model files, on local disk or in any fsspec store.

A checkpoint is just its path (or URL) and the storage options to reach it, so it pickles into
remote calls for free and any host can open it. Its metadata lives in ``fabric_checkpoint.json``
inside it (``framework``, ``label_column``, ``feature_columns``, ...); a fitted preprocessor
in ``preprocessor.pkl``. Files by framework are listed in docs/ml.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from fabric import config, settings

__all__ = ["Checkpoint", "save_preprocessor", "load_preprocessor", "METADATA_FILE", "PREPROCESSOR_FILE"]

METADATA_FILE = "fabric_checkpoint.json"
PREPROCESSOR_FILE = "preprocessor.pkl"


def is_url(path: str) -> bool:
    return "://" in path or "::" in path


def storage_options_for(url: str, given: dict | None = None) -> dict:
    """fsspec options for ``url``: ``given``, else the cluster store's when ``url`` is inside it."""
    if given is not None:
        return dict(given)
    store = settings.get().store
    if store and url.startswith(store.rstrip("/")):
        from fabric.storage import _env_options

        return _env_options()
    return {}


def filesystem(path: str, storage_options: dict | None = None):
    """``(fs, path_in_fs)`` for a local path or an fsspec URL."""
    if not is_url(path):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True), os.path.abspath(os.path.expanduser(path))
    from fsspec.core import url_to_fs

    opts = storage_options_for(path, storage_options)
    if path.startswith(("file://", "local://")):
        opts.setdefault("auto_mkdir", True)
    return url_to_fs(path, **opts)


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def upload_dir(local_dir: str, dest: str, storage_options: dict | None = None) -> None:
    """Copy the files of ``local_dir`` into ``dest`` (created; files already there are kept
    unless overwritten: several ranks may add their files to one checkpoint)."""
    fs, root = filesystem(dest, storage_options)
    if fs.protocol in ("file", "local") or "file" in getattr(fs, "protocol", ()):
        config.private_dir(root)
        shutil.copytree(local_dir, root, dirs_exist_ok=True)
        os.chmod(root, 0o700)  # copytree copied the source folder's mode
        return
    lpaths, rpaths = [], []
    for here, _dirs, names in os.walk(local_dir):
        rel = os.path.relpath(here, local_dir)
        for n in names:
            lpaths.append(os.path.join(here, n))
            rpaths.append("/".join(p for p in (root.rstrip("/"), "" if rel == "." else rel.replace(os.sep, "/"), n)
                                   if p))
    if lpaths:
        fs.put(lpaths, rpaths)
    else:
        fs.makedirs(root, exist_ok=True)


def download_dir(src: str, local_dir: str, storage_options: dict | None = None) -> str:
    fs, root = filesystem(src, storage_options)
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001 - not every filesystem caches
        pass
    found = [p for p in fs.find(root) if p.rstrip("/") != root]
    if not found and not fs.exists(root):
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    os.makedirs(local_dir, mode=0o700, exist_ok=True)
    lpaths = []
    for p in found:
        lp = os.path.join(local_dir, *p[len(root) + 1:].split("/"))
        os.makedirs(os.path.dirname(lp), exist_ok=True)
        lpaths.append(lp)
    if found:
        fs.get(found, lpaths)
    return local_dir


def remove(path: str, storage_options: dict | None = None) -> None:
    fs, root = filesystem(path, storage_options)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass


class Checkpoint:
    """A directory of model files: ``Checkpoint.from_directory(path_or_url)``.

    ``to_directory()`` gives a local copy, ``as_directory()`` a local view (the directory itself
    when it is local, else a temporary download), ``get_metadata``/``set_metadata`` read and
    write ``fabric_checkpoint.json``. Same names as Ray's ``ray.train.Checkpoint``."""

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None):
        path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise TypeError(f"a Checkpoint needs a directory path or URL, got {path!r}")
        if not is_url(path):
            path = os.path.abspath(os.path.expanduser(path))
        self.path = path.rstrip("/") if is_url(path) else path
        self.storage_options = dict(storage_options) if storage_options else None

    @classmethod
    def from_directory(cls, path: str | os.PathLike, storage_options: dict | None = None) -> "Checkpoint":
        """The checkpoint held in ``path`` (a local directory or an fsspec URL)."""
        return cls(path, storage_options)

    def __repr__(self):
        from fabric.storage import redact

        return f"Checkpoint({redact(self.path)!r})"

    def __eq__(self, other):
        return isinstance(other, Checkpoint) and other.path == self.path

    def __hash__(self):
        return hash(self.path)

    def __fabric_cache_key__(self) -> str:
        """What ``@fabric.fn(cache=True)`` keys a Checkpoint argument by: its path and each file's
        name, size and store version (ETag on S3, mtime locally), so a checkpoint rewritten in
        place is a miss, without reading its bytes."""
        fs, root = self.filesystem
        root = root.rstrip("/")
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            found = {}
        files = sorted((p[len(root):], d.get("size"), str(d.get("ETag") or d.get("VersionId") or d.get("mtime")
                                                           or d.get("LastModified") or d.get("created")))
                       for p, d in found.items())
        return f"{self.path}|{files!r}"

    def __fspath__(self):
        if self.is_local:
            return self.path
        raise TypeError(f"{self!r} is remote: use ckpt.as_directory() for a local directory")

    @property
    def is_local(self) -> bool:
        return not is_url(self.path) or self.path.startswith("file://")

    @property
    def filesystem(self):
        """``(fsspec filesystem, path inside it)``."""
        return filesystem(self.path, self.storage_options)

    def _local_path(self) -> str | None:
        if not is_url(self.path):
            return self.path
        if self.path.startswith("file://"):
            return self.path[len("file://"):]
        return None

    def to_directory(self, path: str | os.PathLike | None = None) -> str:
        """Copy the checkpoint into ``path`` (a new temporary directory if None); returns it."""
        dest = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="fabric-ckpt-")
        local = self._local_path()
        if local is not None:
            if not os.path.isdir(local):
                raise FileNotFoundError(f"checkpoint directory {local} does not exist")
            if os.path.abspath(dest) != os.path.abspath(local):
                shutil.copytree(local, dest, dirs_exist_ok=True)
            return dest
        return download_dir(self.path, dest, self.storage_options)

    @contextlib.contextmanager
    def as_directory(self):
        """A local directory with the checkpoint's files, for the block's duration (read-only
        by convention: a local checkpoint is its own directory)."""
        local = self._local_path()
        if local is not None:
            if not os.path.isdir(local):
                raise FileNotFoundError(f"checkpoint directory {local} does not exist")
            yield local
            return
        tmp = tempfile.mkdtemp(prefix="fabric-ckpt-")
        try:
            yield download_dir(self.path, tmp, self.storage_options)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _open(self, name: str, mode: str = "rb"):
        fs, root = self.filesystem
        return fs.open(f"{root.rstrip('/')}/{name}", mode)

    def exists(self, name: str) -> bool:
        fs, root = self.filesystem
        return fs.exists(f"{root.rstrip('/')}/{name}")

    def get_metadata(self) -> dict:
        """The checkpoint's metadata (``{}`` when it has none)."""
        try:
            with self._open(METADATA_FILE, "rb") as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return {}

    def set_metadata(self, metadata: dict) -> None:
        """Replace the metadata (a JSON-serialisable dict)."""
        if not isinstance(metadata, dict):
            raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
        try:
            data = json.dumps(metadata, indent=1, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        fs, root = self.filesystem
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/{METADATA_FILE}", "wb") as f:
            f.write(data)

    def update_metadata(self, metadata: dict) -> None:
        """Merge ``metadata`` into the existing metadata."""
        m = self.get_metadata()
        m.update(metadata)
        self.set_metadata(m)


def save_preprocessor(directory: str, preprocessor) -> None:
    """Pickle a fitted preprocessor into a local checkpoint directory (``preprocessor.pkl``)."""
    if preprocessor is None:
        return
    import cloudpickle

    with open(os.path.join(directory, PREPROCESSOR_FILE), "wb") as f:
        cloudpickle.dump(preprocessor, f)


def load_preprocessor(ckpt: Checkpoint):
    """The checkpoint's fitted preprocessor, or None if it has none."""
    import pickle

    try:
        with ckpt._open(PREPROCESSOR_FILE, "rb") as f:
            return pickle.loads(f.read())
    except FileNotFoundError:
        return None
