"""What a member of a gang sees: its rank, the gang's size and every member's address.

A gang (``fabric.gang(n, ...).run(fn, ...)``) is n calls of one function that the broker
starts together or not at all, each in a worker of its own (docs/gangs.md). The worker that
runs a member sets the context here before the function starts, and also exports it the way
``torchrun`` does (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), so ``torch.distributed.init_process_group()`` works with
no arguments. A leaf module: the worker sets the context, ``fabric.gang_context()`` reads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import FabricError

_current: "GangContext | None" = None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port or 0)


@dataclass(frozen=True)
class GangContext:
    """The context of one gang member (``fabric.gang_context()`` inside the member).

    ``addresses[i]`` is ``"host:port"`` where member ``i`` may listen: a host address its peers
    can reach and a port that was free on that host when the member's worker started.
    ``master_addr``/``master_port`` are rank 0's, for ``torch.distributed``."""

    gang_id: str
    rank: int
    world_size: int
    local_rank: int           # rank among the members on the same executor (host)
    local_world_size: int     # members on the same executor
    addresses: tuple[str, ...]

    @property
    def address(self) -> str:
        """This member's own ``"host:port"``."""
        return self.addresses[self.rank]

    @property
    def host(self) -> str:
        return _split(self.address)[0]

    @property
    def port(self) -> int:
        return _split(self.address)[1]

    @property
    def master_addr(self) -> str:
        return _split(self.addresses[0])[0]

    @property
    def master_port(self) -> int:
        return _split(self.addresses[0])[1]

    def env(self) -> dict[str, str]:
        """The variables ``torchrun`` sets, for this member (already in ``os.environ`` there)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def gang_context() -> GangContext:
    """The running gang member's context: rank, world size, peers' addresses.

    Raises ``FabricError`` outside a gang member (in the driver, in a plain call)."""
    if _current is None:
        raise FabricError("fabric.gang_context() is only available inside a member of a gang: "
                          "run the function with fabric.gang(n, ...).run(fn, ...)")
    return _current


def _enter(body: dict) -> GangContext:
    """Set the context of the member about to run (called by the worker, from the CALL's gang frame)."""
    global _current
    addresses = tuple(str(a) for a in body["addresses"])
    _current = GangContext(gang_id=str(body.get("gang", "")), rank=int(body["rank"]),
                           world_size=int(body["world_size"]), local_rank=int(body.get("local_rank", 0)),
                           local_world_size=int(body.get("local_world_size", 1)), addresses=addresses)
    os.environ.update(_current.env())
    return _current
