"""A replica: one warm ``@fabric.cls`` instance holding the user's deployment object.

The gateway sends it many requests per call (``run_many``); each comes back as an outcome
``(status, body)`` so one request's error does not fail the others. Results are encoded to
JSON here, in the replica, so the gateway only forwards bytes. Async user methods of all the
requests in flight share one event loop, which is what lets ``@serve.batch`` gather them.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import threading
import traceback


class Request:
    """What a deployment that names a ``request`` parameter receives about the HTTP request."""

    __slots__ = ("method", "path", "query_params", "headers", "body")

    def __init__(self, method, path, query_params, headers, body):
        self.method, self.path, self.query_params, self.headers, self.body = method, path, query_params, headers, body

    def json(self):
        return json.loads(self.body) if self.body else None

    def __repr__(self):
        return f"<serve.Request {self.method} {self.path}>"


def _default(o):
    tolist = getattr(o, "tolist", None)   # numpy arrays and scalars
    if tolist is not None:
        return tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"the deployment returned a {type(o).__name__}, which is not JSON serializable")


def encode_json(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return json.dumps(value, default=_default, separators=(",", ":")).encode()


def error_outcome(e: BaseException, debug: bool) -> tuple:
    err = {"error": f"{type(e).__name__}: {e}"}
    if debug:
        err["traceback"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return (500, json.dumps(err).encode())


class Replica:
    """Hosts one deployment object; ``run_many`` serves HTTP, ``call`` serves Python handles."""

    def __init__(self, target, args, kwargs, is_class: bool, debug: bool = False):
        self.obj = target(*args, **kwargs) if is_class else None
        if self.obj is not None:  # the user's @fabric.enter methods, as a @fabric.cls instance runs them
            for name in dir(type(self.obj)):
                attr = getattr(type(self.obj), name, None)
                if callable(attr) and getattr(attr, "__fabric_enter__", False):
                    r = getattr(self.obj, name)()
                    if inspect.isawaitable(r):
                        asyncio.run(r)
        self.fn = target
        self.debug = debug
        self._loop = None
        self._takes_body = {}
        self._lock = threading.Lock()

    def _method(self, name):
        if self.obj is None:
            if name != "__call__":
                raise AttributeError(f"function deployment has no method {name!r}")
            return self.fn
        m = getattr(self.obj, name, None)
        if m is None or name.startswith("_") and name != "__call__" or not callable(m):
            raise AttributeError(f"deployment {type(self.obj).__name__} has no method {name!r}")
        return m

    def _run_coros(self, coros):
        """Await coroutines on this replica's own loop (a thread), shared by concurrent calls."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="serve-loop", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(_gather(coros), self._loop).result()

    def call(self, method, args, kwargs):
        """One call from a Python handle: the plain return value (or the exception)."""
        r = self._method(method)(*args, **kwargs)
        if inspect.isawaitable(r):
            r = self._run_coros([r])[0]
            if isinstance(r, _Failed):
                raise r.exc
        return r

    def run_many(self, method, items):
        """``items``: JSON values, or ``(value, request_meta)`` when the deployment asked for the
        request. Returns one ``(status, body bytes)`` per item, in order."""
        try:
            m = self._method(method)
        except AttributeError as e:
            return [(404, json.dumps({"error": str(e)}).encode())] * len(items)
        body = self._takes_body.get(method)
        if body is None:
            body = self._takes_body[method] = _takes_body(m)
        out = [None] * len(items)
        waits = []
        for i, it in enumerate(items):
            try:
                if type(it) is tuple:
                    value, meta = it
                    r = m(value, request=Request(*meta)) if body else m(request=Request(*meta))
                else:
                    r = m(it) if body else m()
                if inspect.isawaitable(r):
                    waits.append((i, r))
                else:
                    out[i] = (200, encode_json(r))
            except Exception as e:  # noqa: BLE001 - the user's error, answered 500
                out[i] = error_outcome(e, self.debug)
        if waits:
            for (i, _), r in zip(waits, self._run_coros([w for _, w in waits])):
                if isinstance(r, _Failed):
                    out[i] = error_outcome(r.exc, self.debug)
                else:
                    try:
                        out[i] = (200, encode_json(r))
                    except Exception as e:  # noqa: BLE001
                        out[i] = error_outcome(e, self.debug)
        for i, o in enumerate(out):
            if o is None:
                out[i] = error_outcome(RuntimeError("no result"), self.debug)
        return out

    def batch_call(self, method, items):
        """The whole list to one method (the ONNX model's ``infer_http``), which answers per item."""
        return self._method(method)(items)

    def pid(self):
        import os

        return os.getpid()


def _takes_body(m) -> bool:
    """Whether the method has a parameter for the request body (besides ``request``)."""
    try:
        ps = inspect.signature(m).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) and p.name != "request"
               for p in ps)


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


async def _gather(coros):
    async def one(c):
        try:
            return await c
        except Exception as e:  # noqa: BLE001
            return _Failed(e)

    return await asyncio.gather(*(one(c) for c in coros))
