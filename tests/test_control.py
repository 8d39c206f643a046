"""fabric.control's STATUS schema reads what a broker answers, and says so when it cannot."""
import pytest

from fabric import control
from fabric.errors import ProtocolError


def test_a_status_reply_reads_into_typed_records_and_keeps_the_raw_reply():
    raw = {"address": "ipc:///x", "pid": 7, "uptime_s": 1.5, "drivers": 1, "calls_pending": 2, "results_held": 0,
           "instances": 0, "stats": {"submitted": 3, "completed": 1, "retried": 0, "refused": 0, "new_key": 9},
           "executors": [{"id": "ab" * 8, "host": "h", "cpus": 2, "free_cpus": 1.5, "gpus": [0], "free_gpus": [],
                          "memory": 1 << 30, "free_memory": 1 << 29, "gpu_free": {"0": 0.5}, "workers": 2,
                          "busy": 1, "instances": 0, "last_seen_s": 0.2, "labels": {"k": "v"}}],
           "queues": [{"cpus": 1, "gpus": 0, "memory": 0, "depth": 4}],
           "functions": [{"name": "f", "hash": "00", "kind": "fn", "min_warm": 1, "max_containers": None,
                          "running": 0, "waiting": 0, "warm": 1, "cpus": 1, "gpus": 0, "memory": 0}],
           "named": [{"name": "n", "namespace": "default", "actor": "cd" * 8, "class": "C", "detached": True,
                      "alive": False}],
           "gangs": []}
    st = control.ClusterStatus.parse(raw)
    ex = st.executors[0]
    assert (ex.kind, ex.free_cpus, ex.gpu_free, ex.labels) == ("gpu", 1.5, {"0": 0.5}, {"k": "v"})
    assert st.queues[0].depth == 4 and st.functions[0].max_containers is None and st.named[0].cls == "C"
    assert st.stats.submitted == 3 and st.raw is raw


def test_an_older_broker_lacking_keys_reads_as_empty():
    st = control.ClusterStatus.parse({"address": "a"})
    assert st.executors == [] and st.calls_pending == 0 and st.stats.completed == 0


def test_a_malformed_reply_says_what_is_wrong():
    with pytest.raises(ProtocolError, match="malformed STATUS reply"):
        control.ClusterStatus.parse({"executors": [{"cpus": "many"}]})
