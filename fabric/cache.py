"""Cached stages: ``@fabric.fn(cache=True)`` keeps a call's result in the object store.

The key is the function's code hash and the content hash of its arguments, computed on the
worker after Futures among the arguments were resolved there (so a Future's value never passes
through the driver to make the key). Re-running a flow with unchanged code and inputs finds each
stage's result and skips the work; a changed body or argument is a miss. Objects may name their
own stable key with ``__fabric_cache_key__()`` (a Checkpoint by its path, a Dataset by its
blocks' content), for values whose pickle is not a faithful content hash.

Layout in the store: ``cache/<function name>-<code hash>/<arguments hash>``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import pickle

import cloudpickle

PREFIX = "cache"


class _KeyPickler(cloudpickle.Pickler):
    """Pickles for hashing: objects that know their own cache key are replaced by it."""

    def reducer_override(self, obj):
        key = getattr(type(obj), "__fabric_cache_key__", None)
        if key is not None and not isinstance(obj, type):
            return str, (f"fabric-cache-key:{type(obj).__qualname__}:{key(obj)}",)
        return super().reducer_override(obj)


def args_key(args: tuple, kwargs: dict) -> str:
    """A content hash of a call's arguments (raises SerializationError if one cannot be pickled)."""
    from .errors import SerializationError

    f = io.BytesIO()
    try:
        _KeyPickler(f, protocol=5).dump((args, sorted(kwargs.items())))
    except Exception as e:  # noqa: BLE001 - say which argument, not just what pickle said
        for i, a in enumerate((*args, *kwargs.values())):
            try:
                _KeyPickler(io.BytesIO(), protocol=5).dump(a)
            except Exception:  # noqa: BLE001
                raise SerializationError(
                    f"cache=True needs arguments that can be hashed by content: argument {i} of type "
                    f"{type(a).__module__}.{type(a).__qualname__} cannot be pickled ({e})") from e
        raise SerializationError(f"cache=True: the arguments cannot be hashed: {e}") from e
    return hashlib.blake2b(f.getvalue(), digest_size=16).hexdigest()


def stage_prefix(name: str, code_hash: bytes) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    return f"{PREFIX}/{safe}-{code_hash.hex()[:16]}"


def shim(prefix: str, func):
    """What the worker runs for a cached stage: ``run_cached`` bound to it, named as the user's
    function (so ``fabric status`` and the output prefix, ``(prepare pid=..)``, say its name)."""
    p = functools.partial(run_cached, prefix, func)
    p.__name__ = getattr(func, "__name__", "fn")
    p.__qualname__ = getattr(func, "__qualname__", p.__name__)
    p.__module__ = getattr(func, "__module__", None) or "?"
    return p


def run_cached(prefix: str, func, *args, **kwargs):
    """Runs on the worker in place of ``func``: the stored result if there is one, else run and store."""
    from . import storage

    store = storage.default()
    key = f"{prefix}/{args_key(args, kwargs)}"
    try:
        return store.get(key)
    except KeyError:
        pass
    out = func(*args, **kwargs)
    try:
        store.put(key, out)
    except (pickle.PicklingError, TypeError, AttributeError):  # an unstorable result is still a result
        pass
    return out


def entries(store, function: str | None = None) -> list[str]:
    """Cached results' keys in ``store``, optionally of one function (by name)."""
    try:
        keys = store.ls(PREFIX)
    except (KeyError, FileNotFoundError):
        keys = []
    if function:
        keys = [k for k in keys if k.split("/")[1].rsplit("-", 1)[0] == function]
    return sorted(keys)


def clear(store, function: str | None = None) -> int:
    n = 0
    for k in entries(store, function):
        store.delete(k, missing_ok=True)
        n += 1
    return n
