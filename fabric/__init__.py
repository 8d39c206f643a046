"""fabric: a serverless, function-style compute fabric for Python.

    import fabric

    @fabric.fn
    def square(x):
        return x * x

    square.remote(3).result()   # 9, on an embedded local cluster started on first use

See README.md and docs/ for the whole API.
"""
# The public API lives in fabric.api and is loaded on first use (PEP 562): the broker and the
# executor daemon import fabric.broker / fabric.executor, and should not pay ~150 ms for the
# driver's side at every process start.
_API = ("Future", "Gang", "GangContext", "InstanceHandle", "RemoteClass", "RemoteFunction", "cls", "cluster_status",
        "enter", "method", "fn", "gang", "gang_context", "get", "init", "is_initialized", "kill", "put", "shutdown",
        "wait", "nodes", "cluster_resources", "available_resources", "cancel", "Stream", "get_instance")
from typing import TYPE_CHECKING

from . import settings
from .errors import (ActorDied, Cancelled, ConnectionFailed, FabricError, GangFailed, GetTimeout,
                     MemoryLimitExceeded, ProtocolError, RemoteError, RemoteTraceback, SerializationError, TaskTimeout, Unschedulable, WorkerCrashed)
from .errors import RuntimeEnvError, RuntimeEnvSetupError

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and editors see: the names as fabric.api defines them
    from .api import (Future, Gang, GangContext, InstanceHandle, RemoteClass, RemoteFunction, Stream,  # noqa: F401
                      available_resources, cancel, cls, cluster_resources, cluster_status, enter, fn, gang,
                      gang_context, get, get_instance, init, is_initialized, kill, method, nodes, put, shutdown, wait)

settings.get()  # read once, here: a bad FABRIC_* value fails at import, naming the variable


def __getattr__(name):
    import importlib

    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value  # once: later reads are plain attribute reads
        return value
    # apps sit on top of the core: loaded on first use, so `import fabric` stays light
    if name in ("App", "lookup"):
        from . import apps

        return getattr(apps, name)
    if not name.startswith("__"):  # a submodule read as an attribute (fabric.client, fabric.api, ...)
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'fabric' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

__all__ = ["init", "shutdown", "is_initialized", "fn", "cls", "enter", "method", "get", "wait", "put", "kill",
           "cluster_status", "Future", "RemoteFunction", "RemoteClass", "InstanceHandle", "FabricError",
           "WorkerCrashed", "ActorDied", "TaskTimeout", "GetTimeout", "Cancelled", "SerializationError",
           "Unschedulable", "RemoteError", "RemoteTraceback", "ConnectionFailed", "ProtocolError",
           "gang", "Gang", "gang_context", "GangContext", "GangFailed", "MemoryLimitExceeded", "App", "lookup",
           "nodes", "cluster_resources", "available_resources", "cancel", "Stream", "get_instance",
           "RuntimeEnvError", "RuntimeEnvSetupError"]
