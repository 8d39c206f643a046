"""The exceptions a fabric user can see.

Every error fabric itself raises derives from :class:`FabricError`. An exception raised by
user code on the cluster is re-raised on the driver with its own type; its remote traceback
hangs off ``__cause__`` as a :class:`RemoteTraceback`, as in ``concurrent.futures``.
This module is a leaf: every layer may import it.
"""


class FabricError(Exception):
    """Base class of every error raised by fabric itself."""


class WorkerCrashed(FabricError):
    """The process running the call died (signal, ``os._exit``) and its retries are spent."""


class ActorDied(WorkerCrashed):
    """The process hosting a ``@fabric.cls`` instance died, was killed, or its ``__init__`` failed."""


class MemoryLimitExceeded(WorkerCrashed):
    """The call used more memory than its ``memory=`` limit (or its host ran low on memory), so
    its worker was stopped before it could freeze the host. Not retried: it would do it again."""


class GangFailed(WorkerCrashed):
    """A member of this call's gang failed (its process died, it raised, or it timed out), so the
    whole gang was stopped; the message names the member (rank) and what happened to it."""


class TaskTimeout(FabricError, TimeoutError):
    """The call ran longer than its ``timeout=``; its worker was killed and replaced."""


class GetTimeout(FabricError, TimeoutError):
    """``result(timeout=...)``/``fabric.get(..., timeout=...)`` gave up waiting; the call goes on."""


class Cancelled(FabricError):
    """The call was cancelled before it produced a result."""


class SerializationError(FabricError):
    """An argument or a result cannot be pickled; the message names the offending value's type."""


class Unschedulable(FabricError):
    """No executor of the cluster can ever satisfy the call's resource request."""


class RuntimeEnvError(FabricError, ValueError):
    """A ``runtime_env`` that cannot be shipped as given (a working_dir over the size limit),
    raised by ``.remote()`` in the driver before anything reaches the cluster."""


class RuntimeEnvSetupError(FabricError):
    """An executor could not set up a call's ``runtime_env``: a ``pip`` install failed (the
    message names the requirements and ends with pip's last lines), or the working_dir's
    package is not in the executor's store. Every call of that env on that worker raises it."""


class RemoteError(FabricError):
    """User code raised an exception whose type cannot be rebuilt on this side."""

    def __init__(self, type_name: str, message: str, traceback_text: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_traceback = traceback_text


class ConnectionFailed(FabricError):
    """The driver cannot reach (or lost) the broker."""


class ProtocolError(FabricError):
    """A peer sent a message that does not follow ``docs/protocol.md``."""


class RemoteTraceback(Exception):
    """Carries the text of a traceback from the worker; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return "\n\nRemote traceback:\n" + self.tb
