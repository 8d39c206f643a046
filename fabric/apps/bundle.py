"""A deployed app's code: its file and the local modules it imports, by content hash.

Local means outside the Python installation (stdlib, site-packages) and under the app file's
folder: what a user wrote for this app. Installed packages are the cluster's to provide; the
deploy checks on the cluster that the bundle imports there.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import sys
import sysconfig
import zipfile

_EPOCH = (2020, 1, 1, 0, 0, 0)  # fixed timestamps: the same files make the same bundle


def _installed(path: str) -> bool:
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib")}
    return "site-packages" in path or any(path.startswith(r + os.sep) for r in roots)


def local_files(entry_file: str, module_names=None) -> dict[str, str]:
    """relative path -> absolute path of the entry file and the local modules loaded from its folder."""
    root = os.path.dirname(os.path.realpath(entry_file))
    files = {os.path.basename(entry_file): os.path.realpath(entry_file)}
    for name, mod in list(sys.modules.items()):
        if module_names is not None and name not in module_names:
            continue
        path = getattr(mod, "__file__", None)
        if not path or name.split(".")[0] in ("fabric", "__main__"):
            continue
        path = os.path.realpath(path)
        if path.startswith(root + os.sep) and not _installed(path) and path.endswith(".py"):
            files[os.path.relpath(path, root)] = path
    return files


def make(entry_file: str, module_names=None) -> tuple[bytes, str]:
    """(zip bytes, content hash) of the app's code."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, path in sorted(local_files(entry_file, module_names).items()):
            info = zipfile.ZipInfo(rel, _EPOCH)
            info.external_attr = 0o600 << 16
            with open(path, "rb") as f:
                z.writestr(info, f.read())
    data = buf.getvalue()
    return data, hashlib.blake2b(data, digest_size=16).hexdigest()


def unpack(data: bytes, dest: str) -> str:
    os.makedirs(dest, mode=0o700, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"bundle entry {name!r} points outside its folder")
        z.extractall(dest)
    return dest


def load_module(path: str, module_name: str):
    """Import the app file as ``module_name`` (never ``__main__``: its main block does not run),
    with its folder first on sys.path so its local imports resolve."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return mod


def ship_by_value(folder: str) -> None:
    """Pickle the modules loaded from ``folder`` by value, so a worker that never saw the bundle
    (any executor of the cluster) runs the app's functions and the local helpers they call."""
    import cloudpickle

    root = os.path.realpath(folder)
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if path and os.path.realpath(path).startswith(root + os.sep):
            try:
                cloudpickle.register_pickle_by_value(mod)
            except (ValueError, TypeError):
                pass
