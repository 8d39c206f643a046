"""fabric: a serverless, function-style compute fabric for Python.

    import fabric

    @fabric.fn
    def square(x):
        return x * x

    square.remote(3).result()   # 9, on an embedded local cluster started on first use

See README.md and docs/ for the whole API.
"""
from .api import (Future, Gang, GangContext, InstanceHandle, RemoteClass, RemoteFunction, cls, cluster_status, enter,
                  method, fn, gang, gang_context, get, init, is_initialized, kill, put, shutdown, wait,
                  nodes, cluster_resources, available_resources, cancel, Stream, get_instance)
from .errors import (ActorDied, Cancelled, ConnectionFailed, FabricError, GangFailed, GetTimeout,
                     MemoryLimitExceeded, ProtocolError, RemoteError, RemoteTraceback, SerializationError, TaskTimeout, Unschedulable, WorkerCrashed)
from .errors import RuntimeEnvError, RuntimeEnvSetupError

__version__ = "0.1.0"


def __getattr__(name):
    # apps sit on top of the core: loaded on first use, so `import fabric` stays light
    if name in ("App", "lookup"):
        from . import apps

        return getattr(apps, name)
    raise AttributeError(f"module 'fabric' has no attribute {name!r}")

__all__ = ["init", "shutdown", "is_initialized", "fn", "cls", "enter", "method", "get", "wait", "put", "kill",
           "cluster_status", "Future", "RemoteFunction", "RemoteClass", "InstanceHandle", "FabricError",
           "WorkerCrashed", "ActorDied", "TaskTimeout", "GetTimeout", "Cancelled", "SerializationError",
           "Unschedulable", "RemoteError", "RemoteTraceback", "ConnectionFailed", "ProtocolError",
           "gang", "Gang", "gang_context", "GangContext", "GangFailed", "MemoryLimitExceeded", "App", "lookup",
           "nodes", "cluster_resources", "available_resources", "cancel", "Stream", "get_instance",
           "RuntimeEnvError", "RuntimeEnvSetupError"]
