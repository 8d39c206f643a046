"""fsspec-backed object store: ``Store`` and the cluster's default store.

    from fabric import storage
    store = storage.Store("s3://bucket/prefix")   # or file:///path, memory://, a local path
    store.put("key", obj); store.get("key")
    storage.default()                             # the store this cluster shares

The default is resolved on every call, so it follows the environment a worker runs in:
``FABRIC_STORE`` (with ``FABRIC_STORE_OPTIONS``, a JSON object of fsspec storage options),
else what ``set_default`` set (``fabric.init(store=...)`` calls it), else a ``file://`` folder
under the user's data directory (``$XDG_DATA_HOME`` or ``~/.local/share``, then
``fabric/store``).
"""
from __future__ import annotations

import json
import os

from .. import settings

from .objects import CorruptObject
from .store import (
    InvalidStoreURL,
    KeyNotFound,
    StorageCredentialsError,
    StorageError,
    Store,
    redact,
    validate_key,
)

__all__ = [
    "Store", "default", "set_default", "given", "default_local_path",
    "StorageError", "KeyNotFound", "InvalidStoreURL", "StorageCredentialsError", "CorruptObject",
    "validate_key", "redact",
]

_default: Store | None = None


def set_default(store: str | os.PathLike | Store | None, **storage_options) -> Store | None:
    """Make ``store`` (a URL, a path or a ``Store``) the default unless ``FABRIC_STORE`` is set;
    ``None`` forgets it. The URL is checked here, so a bad one fails at ``fabric.init``."""
    global _default
    if store is None or isinstance(store, Store):
        _default = store
    else:
        _default = Store(store, **storage_options)
    return _default


def given() -> Store | None:
    """The store ``set_default`` set (None if none): a store given in code, not by
    ``FABRIC_STORE``. ``fabric.init(store=...)`` hands this to ``fabric.serde.transfer.use_store``."""
    return _default


def default() -> Store:
    """The store fabric uses for checkpoints, datasets and artifacts."""
    url = settings.get().store
    if url:
        return Store(url, **_env_options())
    if _default is not None:
        return _default
    return Store(default_local_path())


def default_local_path() -> str:
    """Where the fallback store lives: in fabric's data folder, ``$FABRIC_HOME/store``, else
    ``$XDG_DATA_HOME/fabric/store`` (or ``~/.local/share/fabric/store``)."""
    home = settings.get().home
    if home:  # one data folder for logs, journal, keys and the store
        return os.path.join(home, "store")
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "fabric", "store")


def _env_options() -> dict:
    raw = settings.get().store_options
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError:
        # The value may hold secrets: say where the problem is, not what the value is.
        raise InvalidStoreURL("FABRIC_STORE_OPTIONS is not valid JSON; it must be a JSON object "
                              "of fsspec storage options, e.g. '{\"endpoint_url\": \"http://...\"}'"
                              ) from None
    if not isinstance(options, dict):
        raise InvalidStoreURL("FABRIC_STORE_OPTIONS must be a JSON object of fsspec storage options")
    return options
