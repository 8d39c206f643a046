"""python -m fabric.autoscale --broker ADDR [--provider local|aws] [--min 0 --max 4 ...]

Runs the autoscaler loop in the foreground until the broker goes away, the parent process
(``--parent-pid``) exits, or SIGTERM/SIGINT. ``--show-decisions LOG`` prints the last
decisions of a decision log (a file, or a cluster's log folder) and exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .. import config
from . import Autoscaler, AwsProvider, LocalProvider, Policy, Pool, decision_log_path, format_decisions, \
    last_decisions


def _groups(items):
    out = {}
    for kv in items:
        if "=" not in kv:
            raise SystemExit(f"--asg and --deployment look like KIND=NAME (e.g. cpu=fabric-cpu), got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fabric.autoscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", help="the broker's address, e.g. tcp://127.0.0.1:5555")
    ap.add_argument("--provider", choices=["local", "aws", "kubernetes"], default="local")
    ap.add_argument("--min", type=int, default=0, help="min cpu executors (default 0: scale to zero)")
    ap.add_argument("--max", type=int, default=4, help="max cpu executors")
    ap.add_argument("--cpus-per-executor", type=float, default=1.0,
                    help="CPUs of one cpu executor; keep executors uniform (see docs/autoscaling.md)")
    ap.add_argument("--memory-per-executor", help="memory one local executor advertises, e.g. 4GiB")
    ap.add_argument("--gpu-min", type=int, default=0)
    ap.add_argument("--gpu-max", type=int, default=0, help="max gpu executors (default 0: no gpu pool)")
    ap.add_argument("--gpus-per-executor", type=int, default=1)
    ap.add_argument("--gpu-cpus-per-executor", type=float, help="CPUs of one gpu executor (default: as cpu ones)")
    ap.add_argument("--gpu-devices", default="",
                    help="local provider: device numbers gpu executors get, e.g. 0,1,2,3")
    ap.add_argument("--idle", type=float, default=60.0, help="idle seconds before an executor is stopped")
    ap.add_argument("--join-timeout", type=float,
                    help="seconds an instance may take to join the broker before it is replaced "
                         "(default: 60 local, 600 aws)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between polls of the broker")
    ap.add_argument("--asg", action="append", default=[], help="aws: KIND=GROUP_NAME, repeatable")
    ap.add_argument("--deployment", action="append", default=[],
                    help="kubernetes: KIND=DEPLOYMENT_NAME, repeatable (see deploy/k8s)")
    ap.add_argument("--namespace", default="fabric", help="kubernetes: the Deployments' namespace")
    ap.add_argument("--region")
    ap.add_argument("--endpoint-url", help="aws: API endpoint (e.g. a moto server)")
    ap.add_argument("--log-dir", help="folder for the decision log, this loop's log and local executors' logs")
    ap.add_argument("--parent-pid", type=int, default=0, help="stop when this process is gone")
    ap.add_argument("--broker-gone", type=float, default=10.0,
                    help="stop when the broker has not answered for this many seconds")
    ap.add_argument("--show-decisions", metavar="LOG", help="print the last decisions of LOG and exit")
    ap.add_argument("-n", type=int, default=20, help="with --show-decisions: how many")
    a = ap.parse_args(argv)

    if a.show_decisions:
        print(format_decisions(last_decisions(a.show_decisions, a.n)) or "no decisions yet")
        return 0
    if not a.broker:
        ap.error("--broker is required")

    config.private_umask()  # its decision log, and the executors it starts: owner-only (docs/security.md)
    if a.log_dir:
        config.private_dir(a.log_dir)
    logging.basicConfig(filename=os.path.join(a.log_dir, "autoscaler.log") if a.log_dir else None,
                        level=logging.INFO, format="%(asctime)s %(levelname)s autoscaler: %(message)s")
    gpu_cpus = a.gpu_cpus_per_executor if a.gpu_cpus_per_executor is not None else a.cpus_per_executor
    pools = [Pool("cpu", a.min, a.max, a.cpus_per_executor)]
    if a.gpu_max > 0:
        pools.append(Pool("gpu", a.gpu_min, a.gpu_max, gpu_cpus, a.gpus_per_executor))
    if a.provider == "local":
        from ..executor.gpus import parse_gpu_list

        provider = LocalProvider(a.broker, cpus=a.cpus_per_executor, memory=a.memory_per_executor,
                                 gpu_devices=parse_gpu_list(a.gpu_devices), gpus_per_executor=a.gpus_per_executor,
                                 gpu_cpus=gpu_cpus, log_dir=a.log_dir)
        join_timeout = a.join_timeout if a.join_timeout is not None else 60.0
    elif a.provider == "kubernetes":
        from .kubernetes import KubernetesProvider

        deployments = _groups(a.deployment)
        if not deployments:
            ap.error("--provider kubernetes needs --deployment cpu=NAME (and --deployment gpu=NAME for a gpu pool)")
        provider = KubernetesProvider(deployments, namespace=a.namespace,
                                      max_replicas={p.kind: p.max for p in pools})
        join_timeout = a.join_timeout if a.join_timeout is not None else 300.0
    else:
        groups = _groups(a.asg)
        if not groups:
            ap.error("--provider aws needs --asg cpu=GROUP (and --asg gpu=GROUP for a gpu pool)")
        provider = AwsProvider(groups, region=a.region, endpoint_url=a.endpoint_url)
        join_timeout = a.join_timeout if a.join_timeout is not None else 600.0
    policy = Policy(pools, idle_s=a.idle, join_timeout_s=join_timeout)
    scaler = Autoscaler(a.broker, provider, policy, log_file=decision_log_path(a.log_dir) if a.log_dir else None,
                        interval=a.interval)
    signal.signal(signal.SIGTERM, lambda *_: scaler.stop())
    signal.signal(signal.SIGINT, lambda *_: scaler.stop())
    logging.getLogger("fabric.autoscale").info(
        "autoscaling %s with the %s provider: %s; idle %gs", a.broker, a.provider,
        ", ".join(f"{p.kind} {p.min}..{p.max} x {p.cpus:g} cpus" for p in pools), a.idle)
    scaler.run(broker_gone_s=a.broker_gone, parent_pid=a.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
