"""The broker: one process that routes calls from drivers to workers and results back.

See :mod:`fabric.broker.core` for the architecture and ``docs/protocol.md`` for the wire format.
"""
from .core import Broker

__all__ = ["Broker"]
