"""Providers: where executors come from. One small interface, so a Kubernetes provider (a
Deployment or a set of Pods per kind) can be added beside these two:

    launch(n, kind) -> [ids]     start n executors of a kind (ids may lag: see AwsProvider)
    terminate(ids)               stop these executors for good
    list() -> [ids]              the provider's live instances (instances() gives their details)

An executor tells the broker which instance it is with the label ``provider_id=ID`` (and its
kind with ``kind=cpu|gpu``); that is how the autoscaler maps the broker's executors to the
provider's instances. Executors without such a label (started by hand) count as capacity but
are never terminated by the autoscaler.
"""
from __future__ import annotations

import builtins
import logging
import os
import secrets
import signal
import subprocess
import sys
import time

from .policy import KIND_LABEL, PROVIDER_LABEL, Machine

log = logging.getLogger("fabric.autoscale")


class Provider:
    """The interface. ``replace`` and ``close`` have defaults; the rest is per provider."""
    name = "?"

    def launch(self, n: int, kind: str = "cpu") -> list[str]:
        raise NotImplementedError

    def terminate(self, ids) -> None:
        raise NotImplementedError

    def instances(self) -> list[Machine]:
        raise NotImplementedError

    def list(self) -> list[str]:
        return [i.id for i in self.instances()]

    def replace(self, ids) -> builtins.list[str]:  # (`list` here is the method above)
        """Terminate these instances and start as many of the same kinds."""
        kinds = {i.id: i.kind for i in self.instances()}
        self.terminate(ids)
        new = []
        for kind in sorted({kinds.get(i, "cpu") for i in ids}):
            new += self.launch(sum(1 for i in ids if kinds.get(i, "cpu") == kind), kind)
        return new

    def close(self) -> None:
        """The autoscaler is stopping. Local processes go with it; cloud instances stay."""


def _child_env():
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_parent, env.get("PYTHONPATH", "")] if p)
    return env


class LocalProvider(Provider):
    """Executors as processes on this machine: ``python -m fabric.executor --broker ADDR --cpus N
    --label provider_id=ID --label kind=KIND``, each in its own session. They watch this process
    (``--parent-pid``), so they do not outlive the autoscaler that started them. ``terminate``
    sends SIGTERM (the executor stops its workers and says EXEC_BYE) and SIGKILL after
    ``term_grace`` seconds.

    GPU executors get ``gpus_per_executor`` devices each from ``gpu_devices`` (disjoint), so
    the gpu pool's size is bounded by the devices this machine has."""
    name = "local"

    def __init__(self, broker: str, cpus: float = 1.0, memory: str | int | None = None, gpu_devices=(),
                 gpus_per_executor: int = 1, gpu_cpus: float | None = None, log_dir: str | None = None,
                 parent_pid: int | None = None, term_grace: float = 3.0, labels: dict | None = None):
        self.broker = broker
        self.cpus = cpus
        self.gpu_cpus = gpu_cpus if gpu_cpus is not None else cpus
        self.memory = memory
        self.free_devices = list(gpu_devices)
        self.gpus_per_executor = int(gpus_per_executor)
        self.log_dir = log_dir
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid
        self.term_grace = term_grace
        self.labels = dict(labels or {})
        self.prefix = secrets.token_hex(2)
        self.counter = 0
        self.procs: dict[str, tuple] = {}       # id -> (Popen, kind, launched_at, devices)
        self.stopping: dict[str, tuple] = {}    # id -> (Popen, kill_at, devices)

    def launch(self, n: int, kind: str = "cpu") -> list[str]:
        ids = []
        for _ in range(n):
            devices = []
            if kind == "gpu":
                if len(self.free_devices) < self.gpus_per_executor:
                    log.warning("local provider: no free GPU devices for another gpu executor")
                    break
                devices = self.free_devices[:self.gpus_per_executor]
                del self.free_devices[:self.gpus_per_executor]
            self.counter += 1
            iid = f"local-{self.prefix}-{self.counter}"
            cpus = self.gpu_cpus if kind == "gpu" else self.cpus
            args = [sys.executable, "-m", "fabric.executor", "--broker", self.broker, "--cpus", f"{cpus:g}",
                    "--gpus", ",".join(str(d) for d in devices),
                    "--label", f"{PROVIDER_LABEL}={iid}", "--label", f"{KIND_LABEL}={kind}"]
            for k, v in self.labels.items():
                args += ["--label", f"{k}={v}"]
            if self.memory is not None:
                args += ["--memory", str(self.memory)]
            if self.log_dir:
                args += ["--log-file", os.path.join(self.log_dir, f"executor-{iid}.log")]
            if self.parent_pid:
                args += ["--parent-pid", str(self.parent_pid)]
            p = subprocess.Popen(args, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            self.procs[iid] = (p, kind, time.time(), devices)
            ids.append(iid)
        return ids

    def terminate(self, ids) -> None:
        now = time.monotonic()
        for iid in ids:
            entry = self.procs.pop(iid, None)
            if entry is None:
                continue
            p, _, _, devices = entry
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.stopping[iid] = (p, now + self.term_grace, devices)
        self._reap()

    def _reap(self):
        now = time.monotonic()
        for iid, (p, kill_at, devices) in list(self.stopping.items()):
            if p.poll() is None and now >= kill_at:
                p.kill()
            if p.poll() is not None:
                del self.stopping[iid]
                self.free_devices += devices
        for iid, (p, kind, _, devices) in list(self.procs.items()):
            if p.poll() is not None:  # died by itself (crash, broker shut it down)
                log.info("local provider: executor %s (pid %d) exited with %s", iid, p.pid, p.returncode)
                del self.procs[iid]
                self.free_devices += devices

    def instances(self) -> list[Machine]:
        self._reap()
        return [Machine(iid, kind, t, "running") for iid, (p, kind, t, _) in self.procs.items()]

    def pid(self, iid: str) -> int | None:
        entry = self.procs.get(iid)
        return entry[0].pid if entry else None

    def close(self) -> None:
        self.terminate(list(self.procs))
        deadline = time.monotonic() + self.term_grace
        while self.stopping and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for p, _, _ in self.stopping.values():
            p.kill()
            p.wait()
        self.stopping.clear()


_GONE = ("Terminating", "Terminating:Wait", "Terminating:Proceed", "Terminated", "Detaching", "Detached",
         "EnteringStandby", "Standby")


class AwsProvider(Provider):
    """One EC2 Auto Scaling group per executor kind (``groups={"cpu": "fabric-cpu", "gpu":
    "fabric-gpu"}``). ``launch`` raises the group's desired capacity (capped at its MaxSize);
    ``terminate`` removes given instances with ``terminate_instance_in_auto_scaling_group``
    and lowers the desired capacity with them, so the group never picks a busy instance
    itself; ``replace`` terminates without lowering it, so the group starts a fresh one.

    The instances' user data must start ``fabric executor --broker ADDR --label
    provider_id=$INSTANCE_ID --label kind=KIND``: that is how an instance is recognised as
    joined. Capacity the group was asked for but has no instance id yet is reported as
    ``requested`` placeholders (``GROUP#requested-N``), so it is not asked for twice; a
    placeholder is terminated by lowering the desired capacity. Set
    ``NewInstancesProtectedFromScaleIn`` on the groups so that lowering it never terminates a
    busy instance. An instance's start time is when this provider first saw it."""
    name = "aws"

    def __init__(self, groups: dict, region: str | None = None, endpoint_url: str | None = None, session=None):
        import boto3

        if not groups:
            raise ValueError("the aws provider needs at least one Auto Scaling group (kind=name)")
        self.groups = dict(groups)
        self.kind_of = {g: k for k, g in self.groups.items()}
        session = session or boto3.session.Session(region_name=region)
        self.asg = session.client("autoscaling", region_name=region, endpoint_url=endpoint_url)
        self.first_seen: dict[str, float] = {}
        self.requested_at: dict[str, float] = {}
        self.serial = 0

    def _describe(self) -> dict:
        out = {}
        paginator = self.asg.get_paginator("describe_auto_scaling_groups")
        for page in paginator.paginate(AutoScalingGroupNames=list(self.groups.values())):
            for g in page["AutoScalingGroups"]:
                out[g["AutoScalingGroupName"]] = g
        missing = set(self.groups.values()) - set(out)
        if missing:
            raise RuntimeError(f"Auto Scaling group(s) not found: {', '.join(sorted(missing))}")
        return out

    @staticmethod
    def _active(g) -> list[str]:
        return [i["InstanceId"] for i in g.get("Instances", []) if i.get("LifecycleState") not in _GONE]

    def desired_capacity(self, kind: str = "cpu") -> int:
        return int(self._describe()[self.groups[kind]]["DesiredCapacity"])

    def instances(self) -> list[Machine]:
        now = time.time()
        out = []
        for name, g in self._describe().items():
            kind = self.kind_of[name]
            states = {i["InstanceId"]: i.get("LifecycleState", "") for i in g.get("Instances", [])}
            active = self._active(g)
            for iid in active:
                t = self.first_seen.setdefault(iid, now)
                out.append(Machine(iid, kind, t, "running" if states[iid] == "InService" else "pending"))
            for k in range(max(0, int(g["DesiredCapacity"]) - len(active))):
                out.append(Machine(f"{name}#requested-{k}", kind, self.requested_at.get(name, now), "requested"))
        for iid in list(self.first_seen):
            if iid not in {i.id for i in out}:
                del self.first_seen[iid]
        return out

    def launch(self, n: int, kind: str = "cpu") -> list[str]:
        name = self.groups.get(kind)
        if name is None:
            raise ValueError(f"no Auto Scaling group for executor kind {kind!r}")
        g = self._describe()[name]
        before = set(self._active(g))
        desired = int(g["DesiredCapacity"])
        new = min(desired + n, int(g["MaxSize"]))
        if new < desired + n:
            log.warning("aws provider: group %s is at its MaxSize %s", name, g["MaxSize"])
        if new == desired:
            return []
        self.asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=new, HonorCooldown=False)
        self.requested_at[name] = time.time()
        after = self._active(self._describe()[name])
        ids = [i for i in after if i not in before]
        now = time.time()
        for i in ids:
            self.first_seen.setdefault(i, now)
        return ids

    def terminate(self, ids) -> None:
        self._remove(ids, decrement=True)

    def replace(self, ids) -> list[str]:
        self._remove(ids, decrement=False)
        return []

    def _remove(self, ids, decrement):
        from botocore.exceptions import ClientError

        placeholders: dict[str, int] = {}
        for iid in ids:
            if "#requested-" in iid:
                name = iid.split("#", 1)[0]
                placeholders[name] = placeholders.get(name, 0) + 1
                continue
            try:
                self.asg.terminate_instance_in_auto_scaling_group(InstanceId=iid,
                                                                  ShouldDecrementDesiredCapacity=decrement)
            except ClientError as e:
                log.warning("aws provider: could not terminate %s: %s", iid, e)
            self.first_seen.pop(iid, None)
        if placeholders and decrement:
            groups = self._describe()
            for name, k in placeholders.items():
                g = groups[name]
                new = max(int(g["MinSize"]), int(g["DesiredCapacity"]) - k)
                self.asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=new, HonorCooldown=False)
