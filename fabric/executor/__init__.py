"""Executors: one daemon per host (or GPU group) and the worker processes it runs.

:mod:`.daemon` advertises the host's resources to the broker and keeps its workers alive;
:mod:`.worker` is the process that runs calls."""
