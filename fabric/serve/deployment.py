"""``@serve.deployment`` and ``.bind``: what to run, with which options. Nothing starts here;
``serve.run`` hands the bound application to the gateway, which starts the replicas."""
from __future__ import annotations

import inspect

from .routing import AutoscalePolicy, normalize_prefix

OPTIONS = {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 1024, "cpus": 1, "gpus": 0,
           "memory": None, "autoscaling_config": None, "idempotent": False, "name": None, "version": "1",
           "queue_timeout_s": 30.0, "health_check_period_s": 2.0}


def check_options(given: dict) -> dict:
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise TypeError(f"@serve.deployment got unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(sorted(OPTIONS))}")
    o = {**OPTIONS, **given}
    for k in ("num_replicas", "max_ongoing_requests"):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, int) or not (0 if k == "num_replicas" else 1) <= v <= 4096:
            raise ValueError(f"{k} must be a whole number from {0 if k == 'num_replicas' else 1} to 4096, got {v!r}")
    mq = o["max_queued_requests"]
    if isinstance(mq, bool) or not isinstance(mq, int) or mq < -1:
        raise ValueError(f"max_queued_requests must be a whole number >= 0, or -1 for no bound, got {mq!r}")
    for k in ("cpus", "gpus"):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{k} must be a number >= 0, got {v!r}")
    for k in ("queue_timeout_s", "health_check_period_s"):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{k} must be a number of seconds > 0, got {v!r}")
    if o["autoscaling_config"] is not None:
        AutoscalePolicy.from_config(o["autoscaling_config"])  # raises on a bad one
    if not isinstance(o["version"], str) or not o["version"]:
        raise ValueError(f"version must be a non-empty string, got {o['version']!r}")
    return o


def wants_request(func) -> bool:
    """A deployment that names a ``request`` parameter gets the HTTP request's details."""
    try:
        return "request" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class Deployment:
    """A class or function made servable. ``.bind(*args)`` gives an :class:`Application`;
    ``.options(**changes)`` a copy with other options."""

    def __init__(self, target, options: dict):
        self.target = target
        self.options_ = options
        self.name = options["name"] or getattr(target, "__name__", "deployment")

    def __repr__(self):
        return f"<serve.deployment {self.name}>"

    def options(self, **changes) -> "Deployment":
        return Deployment(self.target, check_options({**self.options_, **changes}))

    def bind(self, *args, **kwargs) -> "Application":
        if not inspect.isclass(self.target) and (args or kwargs):
            raise TypeError(f"{self.name} is a function deployment: bind() takes no arguments")
        if inspect.isclass(self.target):
            try:
                inspect.signature(self.target).bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{self.name}.bind(): {e}") from None
        return Application(self, args, kwargs)

    def __call__(self, *a, **k):
        raise TypeError(f"{self.name} is a serve deployment: serve.run({self.name}.bind(...)) starts it")


class Application:
    """A deployment with its constructor arguments: what ``serve.run`` takes."""

    def __init__(self, deployment: Deployment, args=(), kwargs=None, kind: str = "json", meta: dict | None = None):
        self.deployment, self.args, self.kwargs = deployment, tuple(args), dict(kwargs or {})
        self.kind = kind          # "json" (a route) or "oip" (a model behind /v2)
        self.meta = meta or {}    # for "oip": the model's metadata

    def spec(self, name: str, route_prefix: str | None) -> dict:
        """What the gateway needs to run it (pickled into an owner-only file, never sent over HTTP)."""
        d = self.deployment
        target = d.target
        call = getattr(target, "__call__", None) if inspect.isclass(target) else target
        is_async = False
        if inspect.isclass(target):
            is_async = any(inspect.iscoroutinefunction(getattr(target, m, None)) for m in dir(target)
                           if not m.startswith("__") or m == "__call__")
        else:
            is_async = inspect.iscoroutinefunction(target)
        if route_prefix is not None:
            route_prefix = normalize_prefix(route_prefix)
        return {"name": name, "route_prefix": route_prefix, "target": target, "args": self.args,
                "kwargs": self.kwargs, "options": d.options_, "kind": self.kind, "meta": self.meta,
                "is_class": inspect.isclass(target), "is_async": is_async,
                "wants_request": bool(call) and wants_request(call)}


def deployment(_target=None, **options):
    """``@serve.deployment`` or ``@serve.deployment(num_replicas=1, max_ongoing_requests=64,
    max_queued_requests=1024, cpus=1, gpus=0, autoscaling_config=None, idempotent=False)``."""
    opts = check_options(options)

    def wrap(target):
        if isinstance(target, Deployment):
            return target.options(**options)
        if not callable(target):
            raise TypeError(f"@serve.deployment decorates a class or a function, got {type(target).__name__}")
        if inspect.isclass(target) and not any("__call__" in vars(k) for k in target.__mro__[:-1]):
            raise TypeError(f"deployment class {target.__name__} needs a __call__ method")
        return Deployment(target, opts)

    return wrap(_target) if _target is not None else wrap
