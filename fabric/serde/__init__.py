"""Payload (de)serialisation: what goes *inside* the frames that ``protocol`` lays out.

One concern per module:

- ``code``: functions and classes, cloudpickled once and keyed by their content hash;
- ``pickling``: arguments, results and errors (pickle 5, out-of-band buffers, Future refs);
- ``shm``: on one host, big numpy arguments through shared-memory files the driver pools;
- ``transfer``: across hosts, large payloads through the cluster's object store.

The broker never unpickles a payload: of these it imports only ``shm``, which holds no pickler,
to remove a dead driver's files (tests/test_layering.py). The names below are the package's
interface, so ``from fabric import serde; serde.X`` works as it did when serde was one module.
"""
from .code import CodePickler, code_blob, load_code
from .pickling import (
    ArgPickler,
    PassThrough,
    _dep,
    _dep_part,
    dumps_args,
    dumps_error,
    dumps_value,
    loads_args,
    loads_error,
    loads_value,
)
from .shm import HOST, SHM_ARENA, SHM_THRESHOLD, ShmPool, _shm_ndarray, release_mappings, sweep_shm
from .transfer import (
    STORE_THRESHOLD,
    TRANSFER_MODES,
    Transfer,
    _unspill,
    spill,
    store_configured,
    store_threshold,
    transfer_for,
    transfer_mode,
)

# The functions a payload's pickle calls keep the names docs/protocol.md (section 4.6) gives
# them, ``fabric.serde._dep`` and so on, whichever module defines them: the bytes on the wire
# are the same as before the package was split, and a worker resolves them through this module.
for _f in (_dep, _dep_part, _shm_ndarray, _unspill):
    _f.__module__ = __name__
del _f

__all__ = [
    "ArgPickler", "CodePickler", "HOST", "PassThrough", "SHM_ARENA", "SHM_THRESHOLD", "STORE_THRESHOLD",
    "ShmPool", "TRANSFER_MODES", "Transfer", "code_blob", "dumps_args", "dumps_error", "dumps_value",
    "load_code", "loads_args", "loads_error", "loads_value", "release_mappings", "spill", "store_configured",
    "store_threshold", "sweep_shm", "transfer_for", "transfer_mode",
]
