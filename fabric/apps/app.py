"""``fabric.App``: a named, deployable set of functions, classes and serve deployments.

The same file runs locally (``python shop.py``: ``@app.fn`` functions are ordinary
``@fabric.fn`` functions on the embedded cluster) and deploys (``fabric deploy shop.py``).
The App only records what it holds; deploying, versions and lookup live beside it.
"""
from __future__ import annotations

import re

import fabric

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_name(name, what="app name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{what} {name!r} cannot be used in a route or a store key: use 1-63 lower-case "
                         f"letters, digits, '-' or '_', starting with a letter or digit (e.g. 'shop', 'churn-v2')")
    return name


class App:
    """``app = fabric.App("shop")``; ``@app.fn(...)``, ``@app.cls(...)``, ``app.deployment(bound, ...)``."""

    def __init__(self, name: str):
        self.name = check_name(name)
        self.functions: dict[str, fabric.RemoteFunction] = {}
        self.classes: dict[str, fabric.RemoteClass] = {}
        self.deployments: dict[str, dict] = {}

    def __repr__(self):
        return (f"<fabric.App {self.name}: {len(self.functions)} functions, {len(self.classes)} classes, "
                f"{len(self.deployments)} deployments>")

    def _add(self, table: dict, name: str, obj):
        check_name(name, "function or class name")
        if name in self.functions or name in self.classes or name in self.deployments:
            raise ValueError(f"app {self.name!r} already has something named {name!r}")
        table[name] = obj
        return obj

    def fn(self, _func=None, **options):
        """As ``@fabric.fn``, and the function becomes part of the app (``fabric.lookup(app, name)``)."""
        def wrap(func):
            rf = func if isinstance(func, fabric.RemoteFunction) else fabric.fn(**options)(func)
            return self._add(self.functions, options.get("name") or func.__name__.lower(), rf)
        return wrap(_func) if _func is not None else wrap

    def cls(self, _cls=None, **options):
        """As ``@fabric.cls``, and the class becomes part of the app."""
        def wrap(klass):
            rc = klass if isinstance(klass, fabric.RemoteClass) else fabric.cls(**options)(klass)
            return self._add(self.classes, options.get("name") or klass.__name__.lower(), rc)
        return wrap(_cls) if _cls is not None else wrap

    def deployment(self, application, *, name: str | None = None, route_prefix: str | None = None):
        """Add a serve deployment (``Scorer.bind(...)``) with its route; deployed with the app."""
        dep = getattr(application, "deployment", None)
        if dep is None or not hasattr(application, "spec"):
            raise TypeError(f"app.deployment takes a bound serve deployment (MyDeployment.bind(...)), "
                            f"got {type(application).__name__}")
        name = name or dep.name.lower()
        route_prefix = route_prefix or f"/{self.name}/{name}"
        if not route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {route_prefix!r}")
        return self._add(self.deployments, name, {"application": application, "route_prefix": route_prefix})

    def names(self) -> dict:
        return {"functions": sorted(self.functions), "classes": sorted(self.classes),
                "deployments": {n: d["route_prefix"] for n, d in sorted(self.deployments.items())}}
