"""Every ``FABRIC_*`` environment variable fabric reads, in one place: :class:`Settings`.

Each field names its variable, its type, its default, who reads it and what it is for;
``docs/settings.md`` is generated from them (``python -m fabric.settings > docs/settings.md``;
``tests/test_settings.py`` fails when the two differ). Modules read :func:`get`, never
``os.environ``.

The environment is read once, on the first :func:`get` of a process (a broker, executor or
worker is started with the environment it needs), and again when ``fabric.init()`` connects a
driver, so that a script or notebook may set ``FABRIC_ADDRESS`` (or any other) before it.
Module constants taken from the settings (``client.MAX_PENDING``, ...) keep the value of
their import. Other code that changes a ``FABRIC_*`` variable of its own process (the
``fabric`` command's ``--keys``, a worker naming itself for nested drivers, a test) calls
:func:`reload`; in the tests, ``monkeypatch.setenv``/``delenv`` do that by themselves
(``tests/conftest.py``). :func:`load` reads any mapping without touching the current settings.

A number that does not parse (``FABRIC_MAX_PENDING=lots``) fails the first :func:`get` with a
``ValueError`` that names the variable. Fields typed ``str | None`` keep the raw text (None when
unset): where they are used, their own checks give the errors a user sees (``FABRIC_TRANSFER``,
``FABRIC_BROKER_TIMEOUT``, ``FABRIC_STORE_OPTIONS``, ...) at the moment they matter, and their
documented default applies there.
"""
from __future__ import annotations

import os
import sys
from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, Mapping

_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int, "int | None": int, "float": float, "str": str, "str | None": str,
    "bool": bool,  # set and not empty
}
_KINDS = {"int": "a whole number", "int | None": "a whole number", "float": "a number"}


def _var(env: str, default: Any, who: str, doc: str, shown: str | None = None, kind: str | None = None,
         internal: bool = False) -> Any:
    """A field of :class:`Settings`: its variable, default, readers and meaning; for the docs, the
    default and the type as they are said when not the value's own (``shown``, ``kind``: a raw
    text checked where it is used); and whether only fabric sets it (``internal``)."""
    return field(default=default, metadata={"env": env, "who": who, "doc": doc, "shown": shown,
                                            "kind": kind, "internal": internal})


@dataclass(frozen=True)
class Settings:
    """fabric's settings, one field a ``FABRIC_*`` variable (see the module's docstring)."""

    # -- where things are ----------------------------------------------------------------------
    address: str | None = _var(
        "FABRIC_ADDRESS", None, "driver, CLI, gateway", "the broker to connect to (empty: as unset); "
        "set in workers so nested calls join their cluster", shown="the cluster `fabric start` recorded, "
        "else an embedded one", kind="address")
    home: str | None = _var(
        "FABRIC_HOME", None, "every process", "fabric's data folder: logs, `cluster.json`, journal, keys, "
        "the fallback store, the object cache", shown="`$XDG_DATA_HOME/fabric` or `~/.local/share/fabric`")
    keys: str | None = _var(
        "FABRIC_KEYS", None, "every process (inherited by the ones it starts)", "CurveZMQ keys directory "
        "(security.md), `none` for none; also `--keys DIR` on `fabric start/executor/status/stop`",
        shown="the owner's default keys for `tcp://`")
    allow_insecure_remote: bool = _var(
        "FABRIC_ALLOW_INSECURE_REMOTE", False, "broker", "set: allows a non-loopback bind without keys "
        "(unsafe: plaintext, no authentication)")
    store: str | None = _var(
        "FABRIC_STORE", None, "`fabric.storage` (driver, workers)", "the default object store's fsspec URL "
        "(storage.md)", shown="`fabric.init(store=...)`, else `$FABRIC_HOME/store`, else "
        "`$XDG_DATA_HOME/fabric/store` or `~/.local/share/fabric/store`")
    store_options: str | None = _var(
        "FABRIC_STORE_OPTIONS", None, "`fabric.storage` (driver, workers)", "the default store's fsspec "
        "storage options, as a JSON object (`{\"endpoint_url\": ...}`)", kind="JSON")
    cache_dir: str | None = _var(
        "FABRIC_CACHE_DIR", None, "driver, workers", "the per-host cache of objects fetched from the store",
        shown="`$FABRIC_HOME/cache/objects`, else `$XDG_CACHE_HOME/fabric/objects` or "
        "`~/.cache/fabric/objects`")
    cache_bytes: str | None = _var(
        "FABRIC_CACHE_BYTES", None, "driver, workers", "bytes or a size (`10GiB`) the object cache holds "
        "before its least recently used objects go", shown="10 GiB", kind="size")
    runtime_env_dir: str | None = _var(
        "FABRIC_RUNTIME_ENV_DIR", None, "workers", "the per-host cache of runtime_env working dirs and pip "
        "installs (runtime_env.md)", shown="`$FABRIC_HOME/cache/runtime_env`, else "
        "`$XDG_CACHE_HOME/fabric/runtime_env` or `~/.cache/fabric/runtime_env`")
    runtime_env_keep: int = _var(
        "FABRIC_RUNTIME_ENV_KEEP", 16, "workers", "working dirs, and as many pip installs, each host keeps in "
        "that cache; beyond, the least recently used that no call runs in are removed")
    # -- drivers -------------------------------------------------------------------------------
    working_dir_limit: str | None = _var(
        "FABRIC_WORKING_DIR_LIMIT", None, "driver", "bytes or a size: the most a runtime_env's working_dir "
        "may hold, after its excludes (runtime_env.md)", shown="100 MiB", kind="size")
    max_pending: int = _var(
        "FABRIC_MAX_PENDING", 100_000, "driver", "calls pending per driver before `.remote()` waits "
        "(backpressure)")
    put_spill: int = _var(
        "FABRIC_PUT_SPILL", 64 << 20, "driver", "bytes from which a `fabric.put` object is written to the "
        "store rather than held by the broker")
    broker_timeout: str | None = _var(
        "FABRIC_BROKER_TIMEOUT", None, "driver", "seconds of silence after which the broker is treated as "
        "gone: pending calls raise `ConnectionFailed`", shown="30 s", kind="seconds")
    wait_warn: float = _var(
        "FABRIC_WAIT_WARN", 10.0, "driver", "seconds a call may wait for resources no executor has free before "
        "the driver logs a warning that says what holds them (0: never)")
    transfer: str | None = _var(
        "FABRIC_TRANSFER", None, "driver, workers", "large objects through the object store: `auto` (across "
        "hosts, when a store is configured), `store` (always), `broker` (never)", shown="`auto`", kind="mode")
    store_threshold: str | None = _var(
        "FABRIC_STORE_THRESHOLD", None, "driver, workers", "bytes or a size: payloads at least this big go "
        "through the store when it is used", shown="8 MiB", kind="size")
    shm_threshold: int = _var(
        "FABRIC_SHM_THRESHOLD", 1 << 20, "driver", "numpy arguments at least this big (bytes) go through "
        "shared memory")
    shm_pool: int = _var(
        "FABRIC_SHM_POOL", 1 << 30, "driver", "bytes of shared-memory files kept for reuse")
    shm_arena: int = _var(
        "FABRIC_SHM_ARENA", 128 << 20, "driver", "bytes of shared memory allocated and mapped ahead, in the "
        "background, when a driver connects to a cluster on its host (0: none)")
    # -- executors and workers -----------------------------------------------------------------
    prefetch: int = _var(
        "FABRIC_PREFETCH", 16, "executor", "credit of pool workers")
    heartbeat_every: float = _var(
        "FABRIC_HEARTBEAT_EVERY", 1.0, "executor", "seconds between an executor's heartbeats (drivers beat "
        "every second, not configurable)")
    memory_reserve: float = _var(
        "FABRIC_MEMORY_RESERVE", 0.05, "executor", "below this fraction of host memory available, the "
        "largest worker is stopped")
    gpus: str | None = _var(
        "FABRIC_GPUS", None, "executor", "device list override (`0,1`; `\"\"` for none)", shown="detect", kind="list")
    node_ip: str | None = _var(
        "FABRIC_NODE_IP", None, "worker", "the address a worker gives its gang's peers",
        shown="this host's address toward the broker")
    memory_poll: float = _var(
        "FABRIC_MEMORY_POLL", 0.02, "worker", "seconds between checks of the private memory of a worker "
        "running a call with `memory=`")
    log_rate: int = _var(
        "FABRIC_LOG_RATE", 256 * 1024, "worker", "bytes per second of output forwarded to drivers per worker")
    # -- the broker ----------------------------------------------------------------------------
    heartbeat_timeout: float = _var(
        "FABRIC_HEARTBEAT_TIMEOUT", 10.0, "broker", "seconds of silence after which an executor is lost")
    driver_timeout: float = _var(
        "FABRIC_DRIVER_TIMEOUT", 30.0, "broker", "seconds of silence after which a driver is treated as "
        "gone (as if it said BYE)")
    no_executor_grace: float = _var(
        "FABRIC_NO_EXECUTOR_GRACE", 30.0, "broker", "seconds calls may wait while there is no executor, "
        "counted from when they began to wait")
    prefetch_below: float = _var(
        "FABRIC_PREFETCH_BELOW", 0.005, "broker", "seconds: calls shorter than this may fill a worker's "
        "credit, up to this much expected work")
    prefetch_one_below: float = _var(
        "FABRIC_PREFETCH_ONE_BELOW", 0.1, "broker", "seconds: calls shorter than this may go one ahead")
    actor_pipeline: int = _var(
        "FABRIC_ACTOR_PIPELINE", 1000, "broker", "calls streamed ahead to an instance")
    max_calls: int = _var(
        "FABRIC_MAX_CALLS", 2_000_000, "broker", "calls held for all drivers before submits are refused")
    journal_compact_bytes: int = _var(
        "FABRIC_JOURNAL_COMPACT_BYTES", 64 << 20, "broker", "bytes of journal after which it is compacted")
    journal_max_record: int = _var(
        "FABRIC_JOURNAL_MAX_RECORD", 16 << 20, "broker", "bytes: calls bigger than this are not journaled "
        "(drivers re-send them)")
    restart_backoff: float = _var(
        "FABRIC_RESTART_BACKOFF", 0.2, "broker supervisor", "seconds before a crashed broker's first "
        "restart")
    # -- fabric.ml -----------------------------------------------------------------------------
    ml_blocks: str = _var(
        "FABRIC_ML_BLOCKS", "shm", "fabric.ml (driver, workers)", "where data blocks live: `shm` (this "
        "host's shared memory) or `store` (the object store; set it in every process)")
    ml_block_dir: str | None = _var(
        "FABRIC_ML_BLOCK_DIR", None, "fabric.ml (driver, workers)", "the folder of shared-memory blocks",
        shown="`/dev/shm/fabric-ml-<uid>`")
    ml_report_timeout: float = _var(
        "FABRIC_ML_REPORT_TIMEOUT", 3600.0, "fabric.ml (workers)", "seconds a training rank waits for the "
        "others' reports")
    ml_peer_grace: float = _var(
        "FABRIC_ML_PEER_GRACE", 3.0, "fabric.ml (workers)", "seconds a rank whose collective failed "
        "waits (a peer likely died) before it raises, so that its gang stops as a whole")
    # -- fabric.serve --------------------------------------------------------------------------
    serve_host: str | None = _var(
        "FABRIC_SERVE_HOST", None, "`serve.run`", "the interface the gateway listens on", shown="127.0.0.1")
    serve_port: int | None = _var(
        "FABRIC_SERVE_PORT", None, "`serve.run`", "the port the gateway listens on", shown="8000")
    serve_token: str | None = _var(
        "FABRIC_SERVE_TOKEN", None, "gateway, `serve` clients", "the bearer token HTTP clients send "
        "(a secret: never logged); needed to listen beyond loopback")
    serve_debug: str | None = _var(
        "FABRIC_SERVE_DEBUG", None, "gateway", "`1`: error answers carry their tracebacks (as `--debug`)", kind="flag")
    # -- set by fabric for its own processes ---------------------------------------------------
    executor_pid: str | None = _var(
        "FABRIC_EXECUTOR_PID", None, "worker", "the executor that started this worker (it exits when that "
        "one dies)", internal=True, kind="int")
    worker_id: str | None = _var(
        "FABRIC_WORKER_ID", None, "driver in a worker", "the worker a nested driver runs in (named in its "
        "HELLO)", internal=True)
    run_file: str | None = _var(
        "FABRIC_RUN_FILE", None, "worker", "the file where a worker marks the call it runs", internal=True)
    user_umask: str | None = _var(
        "FABRIC_USER_UMASK", None, "worker", "the user's umask (octal), which workers restore for user code",
        internal=True, kind="octal")
    app_check: str | None = _var(
        "FABRIC_APP_CHECK", None, "an app's code", "set while `fabric app deploy` imports an app to check it",
        internal=True, kind="flag")


def load(env: Mapping[str, str]) -> Settings:
    """The settings ``env`` gives (a mapping like ``os.environ``); unset variables take their
    defaults. Raises ``ValueError`` naming the variable whose value does not parse."""
    values = {}
    for f in fields(Settings):
        raw = env.get(f.metadata["env"])
        if raw is None:
            continue
        try:
            values[f.name] = _PARSERS[str(f.type)](raw)
        except ValueError:
            raise ValueError(f"{f.metadata['env']} must be {_KINDS[str(f.type)]}, got {raw!r}") from None
    return Settings(**values)


_current: Settings | None = None
_BY_ENV = {f.metadata["env"]: f.name for f in fields(Settings)}


def get() -> Settings:
    """This process's settings, read from its environment the first time."""
    return _current if _current is not None else reload()


def reload(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings again, from ``env`` (default ``os.environ``), and make them current."""
    global _current
    _current = load(os.environ if env is None else env)
    return _current


def of(env: str) -> Any:
    """The current value of the variable named ``env`` (``of("FABRIC_PREFETCH")``)."""
    return getattr(get(), _BY_ENV[env])


def variables() -> list[str]:
    """The names of every variable :class:`Settings` reads."""
    return [f.metadata["env"] for f in fields(Settings)]


def _shown(f: Field[Any]) -> str:
    if f.metadata["shown"]:
        return str(f.metadata["shown"])
    v = f.default
    if v is None or v is False:
        return "unset"
    if isinstance(v, int) and v >= 1024 and v % 1024 == 0:
        for unit in ("GiB", "MiB", "KiB"):
            scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}[unit]
            if v % scale == 0:
                return f"{v // scale} {unit}"
    return f"{v:,}" if isinstance(v, int) else f"`{v}`" if isinstance(v, str) else f"{v:g}"


def markdown() -> str:
    """``docs/settings.md``: the table of every variable, made from :class:`Settings`."""
    head = ["| variable | type | read by | default | meaning |", "|---|---|---|---|---|"]
    user, internal = list(head), list(head)
    for f in fields(Settings):
        kind = f.metadata["kind"] or str(f.type).replace(" | None", "")
        row = (f"| `{f.metadata['env']}` | {kind} | {f.metadata['who']} | {_shown(f)} | "
               f"{f.metadata['doc']} |")
        (internal if f.metadata["internal"] else user).append(row)
    return "\n".join([
        "# Settings", "",
        "<!-- generated from fabric/settings.py by `python -m fabric.settings > docs/settings.md`;",
        "     tests/test_settings.py fails when the two differ: edit the module, then regenerate -->", "",
        "Every `FABRIC_*` environment variable fabric reads. A process reads its environment once, when "
        "it first needs a setting (`fabric.settings.get()`); the processes fabric starts (broker, "
        "executors, workers, gateway) inherit the environment of the one that starts them.", "",
        *user, "",
        "Set by fabric for the processes it starts, not by users:", "",
        *internal, ""])


if __name__ == "__main__":
    sys.stdout.write(markdown())
