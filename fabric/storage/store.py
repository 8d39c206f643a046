"""``Store``: one key/value view over any fsspec filesystem (local, ``memory://``, S3, ...).

fsspec does the talking to each backend; this module adds what a cluster needs on top:

- keys that mean the same thing on every backend (validated, ``/``-separated, relative);
- atomic writes: a reader sees the old object or the new one, never a half-written one;
- one error vocabulary (``KeyNotFound``, ``InvalidStoreURL``, ``StorageCredentialsError``)
  instead of each backend's own, with no secret ever put into a message;
- whole directories (checkpoints) as one atomic object (``put_dir``/``get_dir``, below).

This is the storage layer's one abstraction: ``objects.py`` (content-addressed large objects
and their per-host cache) and the package's default store sit on top of ``Store``'s public
methods, and nothing here imports them.

Directories: an object store has no atomic multi-file write, so a directory is written in two
steps: its files go under a fresh version prefix ``KEY/.fabric-v<version>/``, then a small
manifest ``KEY/.fabric-dir`` naming that version is written atomically. Readers go through the
manifest, so they see the old checkpoint or the new one, never a mix. The version the manifest
named before is deleted once the new one is published; a reader still fetching it rereads the
manifest and starts over.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import posixpath
import tempfile
import time
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .. import config

try:
    from fabric.errors import FabricError, SerializationError
except ImportError:  # the core runtime is optional for the storage layer
    class FabricError(Exception):
        """Base class of every error raised by fabric itself."""

    class SerializationError(FabricError):
        """A value cannot be pickled or unpickled."""


class StorageError(FabricError):
    """Base class of the storage layer's errors."""


class KeyNotFound(StorageError, KeyError):
    """No object is stored under the key. A ``KeyError`` too, so ``except KeyError`` works."""

    def __init__(self, key: str, store: str, hint: str = ""):
        self.key, self.store, self.hint = key, store, hint
        super().__init__(f"no object under key {key!r} in store {store}" + (f" ({hint})" if hint else ""))

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]

    def __reduce__(self):  # travels back from workers as itself, not as a RemoteError
        return type(self), (self.key, self.store, self.hint)


class InvalidStoreURL(StorageError, ValueError):
    """The URL names no usable filesystem: unknown protocol, missing backend package, no bucket."""


class StorageCredentialsError(StorageError, PermissionError):
    """The backend found no credentials, or refused the ones it found."""


# Reserved name prefix for the store's own files (temporary writes, directory manifests,
# directory versions). User keys may not use it, and ls() hides it.
INTERNAL = ".fabric-"
_TMP = INTERNAL + "tmp-"
DIR_MANIFEST = INTERNAL + "dir"
_VERSION = INTERNAL + "v"  # KEY/.fabric-v<version>/: one version of a directory's files
_DIR_FORMAT = 1
_DIR_ATTEMPTS = 5  # reads of a directory that put_dir replaces meanwhile, before giving up

# Backends where one PUT replaces an object atomically (multipart uploads included: the object
# appears only when the upload completes). Anything else gets a temporary key and a move.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "oci"}

_INSTALL = {
    "s3": "pip install 'fabric-compute[s3]'",
    "s3a": "pip install 'fabric-compute[s3]'",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
    "az": "pip install adlfs",
}

_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary "
          "credentials) or AWS_PROFILE, or pass key=/secret= as storage options "
          "(FABRIC_STORE_OPTIONS for the default store); for an S3-compatible server also set "
          "AWS_ENDPOINT_URL",
    "gcs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or pass token= "
           "as a storage option",
    "az": "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with "
          "AZURE_STORAGE_KEY, or pass them as storage options",
}
_CREDENTIAL_HINTS.update(s3a=_CREDENTIAL_HINTS["s3"], gs=_CREDENTIAL_HINTS["gcs"],
                         abfs=_CREDENTIAL_HINTS["az"], abfss=_CREDENTIAL_HINTS["az"])

# Matched by name so that botocore / google-auth need not be importable here.
_CREDENTIAL_ERRORS = {
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "NoAuthTokenError", "UnauthorizedSSOTokenError", "TokenRetrievalError",
    "DefaultCredentialsError", "RefreshError", "ClientAuthenticationError",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "AccessDenied", "Forbidden", "403",
}


def redact(url: str) -> str:
    """``url`` with user info and query values masked, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret_parts(url: str) -> list[str]:
    """The pieces of ``url`` that may be credentials: user info and query string."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [parts.netloc.rsplit("@", 1)[0]] if "@" in parts.netloc else []
    return found + ([parts.query] if parts.query else [])


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Keys are relative, ``/``-separated and free of ``.``/``..``: the same key must name the
    same object on a local disk and in a bucket, and must never escape the store's root."""
    if not isinstance(key, str):
        raise TypeError(f"storage keys are str, not {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    if not key:
        raise ValueError("storage key is empty")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} is absolute; keys are relative to the store's root")
    if "\\" in key:
        raise ValueError(f"storage key {key!r} contains a backslash; separate parts with '/'")
    if "\x00" in key:
        raise ValueError(f"storage key {key!r} contains a NUL character")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"storage key {key!r} has an empty, '.' or '..' part; "
                             f"keys are plain relative paths such as 'runs/1/model.pkl'")
        if part.startswith(INTERNAL):
            raise ValueError(f"storage key {key!r}: names starting with {INTERNAL!r} are reserved")
    return key


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_credentials_error(exc: BaseException, local: bool) -> bool:
    if type(exc).__name__ in _CREDENTIAL_ERRORS:
        return True
    if isinstance(exc, PermissionError):
        return not local  # a cloud backend's 403; locally it is a file mode problem
    code = getattr(exc, "response", None)
    code = code.get("Error", {}).get("Code") if isinstance(code, dict) else None
    return code in _CREDENTIAL_CODES


class Store:
    """A key/value object store rooted at an fsspec URL.

    ``Store("s3://bucket/prefix")``, ``Store("file:///data")``, ``Store("memory://")``, any
    fsspec URL (chained ones too), or a plain local path. Keyword arguments are fsspec storage
    options for the backend (``endpoint_url=``, ``key=``, ``anon=``, ...); they may hold
    secrets, so they are never shown.

    ``put``/``get`` pickle whole Python objects; ``put_bytes``/``get_bytes`` store bytes as they
    are; ``open`` streams; ``put_table``/``get_table`` hold Arrow tables as Parquet;
    ``put_dir``/``get_dir`` hold whole directories (checkpoints) as one atomic object.
    """

    def __init__(self, url: str | os.PathLike, **storage_options):
        url = os.fspath(url)
        if not isinstance(url, str) or not url.strip():
            raise InvalidStoreURL(f"store URL must be a non-empty string, not {url!r}")
        if "://" not in url and "::" not in url:  # a plain local path
            url = "file://" + os.path.abspath(os.path.expanduser(url))
        self._display = redact(url)
        self._secrets = _secret_parts(url)
        proto = url.split("::")[0].split("://")[0] if "://" in url else url.split("::")[0]
        if proto in ("file", "local"):
            storage_options.setdefault("auto_mkdir", True)
        try:
            self.fs, root = url_to_fs(url, **storage_options)
        except ImportError as e:
            hint = _INSTALL.get(proto)
            raise InvalidStoreURL(
                f"store {self._display} needs a backend package that is not installed: "
                f"{hint or self._scrub(e)}") from None
        except ValueError as e:
            if "Protocol not known" not in str(e):
                raise InvalidStoreURL(f"store URL {self._display} is invalid: {self._scrub(e)}") from None
            known = ", ".join(sorted(fsspec.available_protocols()))
            raise InvalidStoreURL(
                f"store URL {self._display}: unknown protocol {proto!r}; fsspec knows {known}"
            ) from None
        self._local = isinstance(self.fs, LocalFileSystem)
        self.protocol = _protocol(self.fs)
        self._root = root.rstrip("/")
        if not self._root and self.fs.root_marker == "":
            raise InvalidStoreURL(f"store URL {self._display} names no bucket or container, "
                                  f"e.g. {self.protocol}://bucket/prefix")

    def __repr__(self) -> str:
        return f"Store({self._display!r})"

    @property
    def display(self) -> str:
        """The store's URL with any credential masked: what messages and logs may show."""
        return self._display

    __str__ = __repr__

    # --- paths and errors ------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return f"{self._root}/{key}"

    def url(self, key: str = "") -> str:
        """The fsspec URL of ``key`` (of the root when empty), for tools that take URLs."""
        path = self._path(validate_key(key)) if key else (self._root or self.fs.root_marker)
        return self.fs.unstrip_protocol(path)

    def _scrub(self, exc: BaseException) -> str:
        """``exc``'s text with any credential from the store URL masked."""
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextmanager
    def _errors(self, key: str, writing: bool = False):
        """Translate backend exceptions into the storage vocabulary, naming no secrets. The
        backend's exception stays chained for debugging unless the URL itself holds secrets."""
        try:
            yield
        except StorageError:
            raise
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as e:
            cause = None if self._secrets else e
            if writing:
                raise StorageError(f"cannot write {key!r} to store {self._display}: "
                                   f"{self._scrub(e)}") from cause
            hint = self._dir_hint(key) or ("it is a folder" if isinstance(e, IsADirectoryError) else "")
            raise KeyNotFound(key, self._display, hint) from cause
        except Exception as e:
            if not _is_credentials_error(e, self._local):
                raise
            hint = _CREDENTIAL_HINTS.get(self.protocol, "check the storage options' credentials")
            raise StorageCredentialsError(
                f"access to store {self._display} was refused or no credentials were found "
                f"({self._scrub(e)}); {hint}") from (None if self._secrets else e)

    def _dir_hint(self, key: str) -> str:
        try:
            if self.fs.isfile(self._path(f"{key}/{DIR_MANIFEST}")):
                return "it holds a directory written by put_dir; read it with get_dir"
        except Exception:
            pass
        return ""

    def _fresh(self, path: str) -> None:
        """Drop fsspec's cached listings: other processes write to the same store."""
        self.fs.invalidate_cache(path)

    # --- atomic writes ---------------------------------------------------------------------
    def _tmp_sibling(self, path: str) -> str:
        return f"{posixpath.dirname(path)}/{_TMP}{uuid.uuid4().hex}"

    def _writer(self, path: str, key: str) -> "_AtomicWriter":
        """A binary file whose content appears under ``path`` only when it is closed cleanly."""
        if self._local:
            # Same directory, so os.replace is a rename: atomic on POSIX and on Windows.
            # Owner-only, whatever the umask: folders 0700, objects 0600 (docs/security.md)
            tmp = self._tmp_sibling(path)
            with self._errors(key, writing=True):
                config.private_dir(os.path.dirname(path))
                f = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

            def commit():
                f.flush()
                os.fsync(f.fileno())  # survive a crash, not just a concurrent reader
                f.close()
                with self._errors(key, writing=True):
                    os.replace(tmp, path)
        else:
            # Spool locally, then hand the whole object to the backend in one upload.
            f = tempfile.NamedTemporaryFile(prefix="fabric-upload-", delete=False)
            tmp = f.name

            def commit():
                f.close()
                try:
                    with self._errors(key, writing=True):
                        self._publish(path, lambda dest: self.fs.put_file(tmp, dest))
                finally:
                    os.unlink(tmp)

        def discard():
            f.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

        return _AtomicWriter(f, commit, discard)

    def _publish(self, path: str, write) -> None:
        """Run ``write(dest)`` so that ``path`` changes in one step on a remote backend."""
        if self.protocol in _ATOMIC_PUT:
            write(path)
            return
        tmp = self._tmp_sibling(path)
        try:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        except (OSError, NotImplementedError):
            pass
        try:
            write(tmp)
            self.fs.mv(tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except Exception:
                pass
            raise
        finally:
            self._fresh(path)

    def _write_bytes(self, path: str, data, key: str) -> None:
        if self._local:
            with self._writer(path, key) as f:
                f.write(data)
        else:
            with self._errors(key, writing=True):
                self._publish(path, lambda dest: self.fs.pipe_file(dest, bytes(data)))

    # --- the public surface ----------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` as is (no pickling), so other tools can read the object."""
        self._write_bytes(self._path(validate_key(key)), data, key)

    def get_bytes(self, key: str) -> bytes:
        """The stored bytes of ``key``, exactly as written (by any put method)."""
        path = self._path(validate_key(key))
        with self._errors(key):
            self._fresh(path)
            return self.fs.cat_file(path)

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Download the object under ``key`` into the local file ``local_path`` (streamed:
        one request on S3, a copy for a local store); ``KeyNotFound`` if there is none."""
        path = self._path(validate_key(key))
        with self._errors(key):
            self._fresh(path)
            if not self.fs.isfile(path):  # a folder, or nothing: never a half-made local file
                raise FileNotFoundError(path)
            self.fs.get_file(path, os.fspath(local_path))

    def put(self, key: str, obj) -> None:
        """Pickle ``obj`` (protocol 5; cloudpickle for lambdas and ``__main__`` classes) under
        ``key``. Always pickles, bytes included: use ``put_bytes`` for raw bytes."""
        path = self._path(validate_key(key))
        with self._writer(path, key) as f:
            try:
                pickle.dump(obj, f, protocol=5)
            except (pickle.PicklingError, TypeError, AttributeError):
                f.seek(0)
                f.truncate()
                import cloudpickle

                try:
                    cloudpickle.dump(obj, f, protocol=5)
                except Exception as e:
                    raise SerializationError(
                        f"cannot pickle a {type(obj).__qualname__} for key {key!r}: {e}") from e

    def get(self, key: str):
        """Unpickle the object stored under ``key`` by ``put``."""
        validate_key(key)
        try:
            if self._local:
                with self.open(key, "rb") as f:
                    return pickle.load(f)
            return pickle.loads(self.get_bytes(key))  # one GET: a consistent snapshot
        except (StorageError, OSError, MemoryError):
            raise
        except Exception as e:
            raise SerializationError(
                f"cannot unpickle key {key!r} of store {self._display} "
                f"(written by put_bytes or put_table? read it with get_bytes/get_table): "
                f"{type(e).__name__}: {e}") from e

    def open(self, key: str, mode: str = "rb"):
        """A file object for ``key``. Writing modes ("wb", "w") publish the object when the
        file is closed, and never if the ``with`` block raised."""
        path = self._path(validate_key(key))
        if mode in ("rb", "r"):
            with self._errors(key):
                self._fresh(path)
                return self.fs.open(path, mode)
        if mode in ("wb", "w"):
            f = self._writer(path, key)
            return f if mode == "wb" else _AtomicTextWriter(f, encoding="utf-8")
        raise ValueError(f"mode {mode!r} is not supported; use 'rb', 'r', 'wb' or 'w'")

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object or a directory written by ``put_dir``."""
        path = self._path(validate_key(key))
        with self._errors(key):
            self._fresh(path)
            return self.fs.isfile(path) or self.fs.isfile(f"{path}/{DIR_MANIFEST}")

    def ls(self, prefix: str = "") -> list[str]:
        """Sorted keys under the folder-like ``prefix`` (all of them when empty), recursively.
        A directory written by ``put_dir`` is listed once, as its key with a trailing ``/``."""
        base = self._path(validate_key(prefix, allow_empty=True)) if prefix else self._root
        with self._errors(prefix or "/"):
            self._fresh(base)
            try:
                found = self.fs.find(base or self.fs.root_marker)
            except FileNotFoundError:
                return []
        strip = len(self._root) + 1
        keys = set()
        for path in found:
            if path == base:  # the prefix is itself an object
                keys.add(prefix)
                continue
            parts = path[strip:].split("/")
            internal = [i for i, p in enumerate(parts) if p.startswith(INTERNAL)]
            if not internal:
                keys.add("/".join(parts))
            elif internal[0] == len(parts) - 1 and parts[-1] == DIR_MANIFEST:
                keys.add("/".join(parts[:-1]) + "/")
        return sorted(keys)

    def delete(self, key: str, missing_ok: bool = False) -> None:
        """Remove the object or directory under ``key``; ``KeyNotFound`` if there is none."""
        path = self._path(validate_key(key))
        manifest = f"{path}/{DIR_MANIFEST}"
        with self._errors(key):
            self._fresh(path)
            if self.fs.isfile(path):
                self.fs.rm_file(path)
            elif self.fs.isfile(manifest):
                self.fs.rm_file(manifest)  # readers stop seeing it here, before the files go
                self.fs.rm(path, recursive=True)
            elif not missing_ok:
                raise KeyNotFound(key, self._display)
            self._fresh(path)

    def put_table(self, key: str, table, **write_options) -> None:
        """Store a ``pyarrow.Table`` as Parquet (readable by any Parquet tool)."""
        pq = _parquet()
        with self.open(key, "wb") as f:
            pq.write_table(table, f, **write_options)

    def get_table(self, key: str, columns: list[str] | None = None):
        """Read a Parquet object back as a ``pyarrow.Table`` (only ``columns`` if given)."""
        pq = _parquet()
        with self.open(key, "rb") as f:
            return pq.read_table(f, columns=columns)

    def put_dir(self, key: str, local_dir: str | os.PathLike) -> None:
        """Store a whole local directory (a checkpoint) under ``key``, atomically."""
        validate_key(key)
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

        path = self._path(key)
        previous = self._manifest(key, missing_ok=True)
        version = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        prefix = f"{path}/{_VERSION}{version}"
        with self._errors(key, writing=True):
            if self._local:  # owner-only, whatever the umask: the version's folder first, then its files
                config.private_dir(prefix)
            if files:
                rels = sorted(files)
                self.fs.put([os.path.join(local_dir, *r.split("/")) for r in rels],
                            [f"{prefix}/{r}" for r in rels])
            if self._local:
                _owner_only(prefix)
        manifest = {"format": _DIR_FORMAT, "version": version, "files": files, "dirs": sorted(dirs)}
        self._write_bytes(f"{path}/{DIR_MANIFEST}", json.dumps(manifest).encode(), key)
        if previous and previous["version"] != version:
            with self._errors(key):
                try:
                    self.fs.rm(f"{path}/{_VERSION}{previous['version']}", recursive=True)
                except FileNotFoundError:
                    pass
                self._fresh(path)

    def get_dir(self, key: str, local_dir: str | os.PathLike) -> str:
        """Download the directory stored under ``key`` into ``local_dir``; returns its path.
        A ``put_dir`` replacing it meanwhile makes it start over (a few times)."""
        attempts = _DIR_ATTEMPTS
        validate_key(key)
        local_dir = os.path.abspath(os.fspath(local_dir))
        path = self._path(key)
        for attempt in range(attempts):
            manifest = self._manifest(key)
            prefix = f"{path}/{_VERSION}{manifest['version']}"
            os.makedirs(local_dir, exist_ok=True)
            for d in manifest["dirs"]:
                os.makedirs(os.path.join(local_dir, *d.split("/")), exist_ok=True)
            rels = sorted(manifest["files"])
            lpaths = [os.path.join(local_dir, *r.split("/")) for r in rels]
            for lp in lpaths:
                os.makedirs(os.path.dirname(lp), exist_ok=True)
            with self._errors(key):
                try:
                    if rels:
                        self.fs.get([f"{prefix}/{r}" for r in rels], lpaths)
                    return local_dir
                except FileNotFoundError:  # a newer put_dir replaced this version: start over
                    time.sleep(0.01 * 2**attempt)
        raise StorageError(f"directory {key!r} of store {self._display} was replaced {attempts} "
                           f"times while it was being read; try again")

    def _manifest(self, key: str, missing_ok: bool = False):
        """The manifest of the directory under ``key`` (None if there is none and ``missing_ok``)."""
        path = self._path(f"{key}/{DIR_MANIFEST}")
        try:
            with self._errors(key):
                self._fresh(path)
                manifest = json.loads(self.fs.cat_file(path))
        except KeyNotFound:
            if missing_ok:
                return None
            hint = ""
            try:
                if self.fs.isfile(self._path(key)):
                    hint = "it holds a single object; read it with get/get_bytes"
            except Exception:
                pass
            raise KeyNotFound(key, self._display, hint) from None
        if manifest.get("format") != _DIR_FORMAT:
            raise StorageError(f"directory {key!r} was written by a newer fabric (format "
                               f"{manifest.get('format')!r}); upgrade fabric to read it")
        return manifest


def _owner_only(top: str) -> None:
    """Folders 0700 and files 0600 under ``top`` (what fsspec's copy made under the umask)."""
    for here, _, names in os.walk(top):
        os.chmod(here, 0o700)
        for name in names:
            os.chmod(os.path.join(here, name), 0o600)


def _rel(here: str, name: str) -> str:
    rel = name if here == "." else os.path.join(here, name)
    return rel.replace(os.sep, "/")


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("Arrow tables need pyarrow: pip install 'fabric-compute[arrow]'") from e
    return pq


class _AtomicWriter(io.BufferedIOBase):
    """Binary writer over a temporary file: ``close()`` publishes it, an exception inside a
    ``with`` block (or ``discard()``) throws it away. Dropped unclosed, it is discarded."""

    def __init__(self, f, commit, discard):
        self._f, self._commit, self._discard, self._done = f, commit, discard, False

    def writable(self):
        return True

    def seekable(self):
        return True

    def write(self, b):
        if self._done:
            raise ValueError("write to a closed store file")
        return self._f.write(b)

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def truncate(self, size=None):
        return self._f.truncate(size)

    def flush(self):
        if not self._done:
            self._f.flush()

    @property
    def closed(self):
        return self._done

    def close(self):
        if self._done:
            return
        self._done = True
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise

    def discard(self):
        if not self._done:
            self._done = True
            self._discard()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __del__(self):
        try:
            self.discard()
        except Exception:
            pass


class _AtomicTextWriter(io.TextIOWrapper):
    """Text mode over ``_AtomicWriter``, keeping its publish-on-clean-close rule."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.buffer.discard()  # closed now, so TextIOWrapper.close() skips the flush
        return super().__exit__(exc_type, exc, tb)

    def discard(self):
        self.buffer.discard()

    def __del__(self):  # TextIOWrapper's own finaliser would close, i.e. publish
        try:
            self.buffer.discard()
        except Exception:
            pass
