"""fabric.apps: named, versioned, deployable apps (``fabric.App``, ``fabric deploy``,
``fabric.lookup``). Built on the public core API and ``fabric.storage`` only: the registry is
in the cluster's store, so the broker needs no new message kind (docs/apps.md)."""
from .app import App
from .deploy import deploy, rollback, stop
from .lookup import Handle, lookup
from .registry import AppError, Registry

__all__ = ["App", "deploy", "rollback", "stop", "lookup", "Handle", "AppError", "Registry"]
