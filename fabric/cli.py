"""The ``fabric`` command: start, join, inspect and stop a cluster.

    fabric start [--port 5555] [--detach]   broker + local executor; prints the address
    fabric executor --broker ADDR           join this host's executor to a running broker
    fabric status [--address ADDR]          executors, workers, resources, queues
    fabric stop [--address ADDR]            stop the cluster
    fabric keys init DIR                    CurveZMQ keys; then `fabric start --host 0.0.0.0 --keys DIR`

Every cluster on TCP uses CurveZMQ keys: by default this user's, made on first use in the data
folder (docs/security.md). The command runs under umask 077: what it writes is owner-only.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import click

from . import config
from . import protocol as P
from . import settings
from .config import pid_alive
from .errors import FabricError

DEFAULT_PORT = 5555


def _recorded():
    try:
        with open(config.state_file()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _valid_address(address, where="--address"):
    """A broker address, or a usage error that shows the expected form (not a ZMQError traceback)."""
    ok = isinstance(address, str) and (
        address.startswith("ipc://") and len(address) > 6 or
        address.startswith("tcp://") and address[6:].rpartition(":")[2].isdigit() and address[6:].rpartition(":")[0])
    if not ok:
        raise click.BadParameter(f"{address!r} is not a broker address: it looks like tcp://host:port "
                                 f"(e.g. tcp://127.0.0.1:5555) or ipc:///path/to/socket", param_hint=where)
    return address


def _address(address):
    if address:
        return _valid_address(address)
    if settings.get().address:
        return _valid_address(settings.get().address, "FABRIC_ADDRESS")
    rec = _recorded()
    if rec:
        if rec.get("keys") and not settings.get().keys:
            os.environ["FABRIC_KEYS"] = rec["keys"]  # the keys that cluster was started with
            settings.reload()
        return rec["address"]
    raise click.ClickException("no fabric cluster is running here: `fabric start` has recorded none. Start one with "
                               "`fabric start --detach`, or reach one elsewhere with --address or FABRIC_ADDRESS")


def _check_host(host):
    """Listening beyond loopback needs CurveZMQ keys: whoever can submit can run code."""
    from . import security

    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.") or security.configured():
        return
    raise click.ClickException(
        f"refusing to listen on {host}: a fabric broker runs any code it is sent, so without a keys directory given "
        f"on purpose it listens on loopback (127.0.0.1) only. Make keys with `fabric keys init DIR` and start with "
        f"`fabric start --host {host} --keys DIR` (see `fabric keys --help`; this user's default keys are in "
        f"{os.path.join(config.data_dir(), 'keys')}).")


def _use_keys(ctx, param, value):
    if value:  # for this command and every process it starts (they inherit the environment)
        os.environ["FABRIC_KEYS"] = os.path.abspath(os.path.expanduser(value))
        settings.reload()
    return value


_keys_option = click.option("--keys", metavar="DIR", callback=_use_keys, expose_value=False, is_eager=True,
                            help="CurveZMQ keys directory (default: $FABRIC_KEYS); see `fabric keys --help`")


def _check_keys(**need):
    """The keys directory in use (None: no keys), checked up front for what this command needs."""
    from . import security

    root = security.keys_dir()
    if root:
        try:
            security.check(root, **need)
        except FabricError as e:
            raise click.ClickException(str(e)) from None
    return root


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fabric-compute", prog_name="fabric")
def main():
    """fabric: a serverless, function-style compute fabric for Python."""
    config.private_umask()


@main.command()
@_keys_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to listen on; beyond loopback (e.g. 0.0.0.0) only with --keys")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--cpus", type=click.FloatRange(min=1), help="CPUs of the local executor (default: all)")
@click.option("--gpus", help="GPU device numbers of the local executor, e.g. 0,1 (default: detect)")
@click.option("--memory", help="memory of the local executor, e.g. 8GiB (default: all)")
@click.option("--no-executor", is_flag=True, help="start the broker only")
@click.option("--detach", is_flag=True, help="run in the background and return")
@click.option("--autoscale", metavar="MIN:MAX", help="autoscale local executors (of --cpus each, default 1) "
              "between MIN and MAX, starting with MIN; see docs/autoscaling.md")
@click.option("--idle", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="with --autoscale: idle seconds before an executor is stopped")
@click.option("--journal/--no-journal", default=True, show_default=True,
              help="record accepted calls so a broker that dies is restarted without losing any "
                   "(see docs/guarantees.md)")
@click.option("--serve", "serve_port", type=click.IntRange(1, 65535), is_flag=False, flag_value=8000, default=None,
              help="also run the HTTP serving gateway on 127.0.0.1:PORT (default 8000; docs/serving.md)")
def start(host, port, cpus, gpus, memory, no_executor, detach, autoscale, idle, journal, serve_port):
    """Start a broker and a local executor; prints the address drivers use."""
    from .cluster import LocalCluster
    from .executor.gpus import parse_gpu_list
    from .resources import parse_memory

    _check_host(host)
    # every argument is checked before anything is written (the default keys below): a refused
    # command leaves nothing behind
    try:
        gpu_list = parse_gpu_list(gpus) if gpus is not None else None
        mem = parse_memory(memory) if memory else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if autoscale:
        try:
            lo, hi = (int(x) for x in autoscale.split(":"))
            if not 0 <= lo <= hi:
                raise ValueError
        except ValueError:
            raise click.BadParameter("looks like MIN:MAX with 0 <= MIN <= MAX, e.g. 0:4",
                                     param_hint="--autoscale") from None
    keys = _check_keys(broker_secret=True, pair=None if no_executor and not autoscale else "executor")
    from . import security

    try:  # this user's default keys, made now (once) rather than by the broker and executor at once
        in_use = security.keys_dir(f"tcp://{host}:{port}")
    except FabricError as e:
        raise click.ClickException(str(e)) from None
    rec = _recorded()
    if rec and pid_alive(rec.get("broker_pid", 0)):
        raise click.ClickException(f"a cluster started by `fabric start` is already running at {rec['address']}; "
                                   f"`fabric stop` it first")
    address = f"tcp://{host}:{port}"
    if _port_taken(host, port):
        raise click.ClickException(f"port {port} on {host} is in use; choose another with --port")
    cluster = LocalCluster(address=address, cpus=cpus, gpus=gpu_list, memory=mem,
                           parent_pid=0 if detach else os.getpid(), log_dir=config.new_log_dir("cluster"),
                           journal=os.path.join(config.data_dir(), f"journal-{port}.bin") if journal else None)
    cluster.start(executor=not no_executor and not autoscale)
    if autoscale:
        cluster.start_autoscaler(lo, hi, idle=idle, cpus_per_executor=cpus or 1)
    if serve_port:  # the gateway stops with the broker (fabric.serve watches its pid)
        cluster.procs.append(cluster._spawn("fabric.serve", ["--address", address, "--port", str(serve_port),
                                                             "--broker-pid", str(cluster.procs[0].pid)]))
        # and the apps reconciler: it brings the deployed apps' deployments back after a restart
        cluster.procs.append(cluster._spawn("fabric.apps.reconciler", ["--address", address,
                                                                       "--broker-pid", str(cluster.procs[0].pid)]))
    with config.private_open(config.state_file(), "w") as f:
        json.dump({"address": address, "broker_pid": cluster.procs[0].pid, "pids": cluster.pids,
                   "log_dir": cluster.log_dir, "keys": keys}, f)
    from .control import request

    deadline = time.monotonic() + 10
    while True:
        try:
            request(address, P.STATUS, timeout=0.5)
            break
        except FabricError:
            if time.monotonic() > deadline or cluster.procs[0].poll() is not None:
                cluster.stop()
                raise click.ClickException(f"the broker did not start; see {cluster.log_dir}/broker.log") from None
    click.echo(f"fabric cluster running at {address}")
    reach = address
    if host in ("0.0.0.0", "::", "*"):  # listening on every interface: others dial this host's name
        import socket

        reach = f"tcp://{socket.getfqdn() or socket.gethostname()}:{port}"
    click.echo(f"  connect a driver:   fabric.init(address=\"{reach}\")  or  export FABRIC_ADDRESS={reach}")
    click.echo(f"  add an executor:    fabric executor --broker {reach}" + (" --keys DIR" if keys else ""))
    if keys:
        click.echo(f"  keys:               {keys} (CurveZMQ); other hosts need a keys directory from "
                   f"`fabric keys add-client NAME` or `add-executor NAME`")
    elif in_use:
        click.echo(f"  keys:               {in_use} (CurveZMQ, this user's: only this user's processes get in; "
                   f"let others in with `fabric keys add-client NAME --public-key FILE`)")
    else:
        click.echo("  keys:               none (FABRIC_KEYS=none): every user of this host can run code here")
    click.echo(f"  logs:               {cluster.log_dir}")
    if serve_port:
        click.echo(f"  serving gateway:    http://127.0.0.1:{serve_port} (docs/serving.md)")
    if detach:
        return
    click.echo("press Ctrl-C to stop")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop and cluster.procs[0].poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    cluster.stop()
    _forget(address)
    click.echo("stopped")


@main.command()
@_keys_option
@click.option("--broker", "broker", required=True, help="address of the broker, e.g. tcp://127.0.0.1:5555")
@click.option("--cpus", type=click.FloatRange(min=1))
@click.option("--gpus", help="GPU device numbers, e.g. 0,1 (default: detect)")
@click.option("--memory", help="e.g. 8GiB (default: all of this host's)")
@click.option("--label", multiple=True, help="key=value, repeatable")
def executor(broker, cpus, gpus, memory, label):
    """Join this host's executor to a running broker (runs in the foreground)."""
    from .executor.daemon import ExecutorDaemon
    from .executor.gpus import parse_gpu_list
    from .resources import parse_memory

    _valid_address(broker, "--broker")
    try:
        labels = dict(kv.split("=", 1) for kv in label)
    except ValueError:
        raise click.BadParameter("labels look like key=value", param_hint="--label") from None
    try:
        gpu_list = parse_gpu_list(gpus) if gpus is not None else None
        mem = parse_memory(memory) if memory else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    _check_keys(pair="executor")
    log_file = os.path.join(config.new_log_dir("executor"), "executor.log")
    logging.basicConfig(filename=log_file, level=logging.INFO, format="%(asctime)s %(levelname)s executor: %(message)s")
    click.echo(f"executor joining {broker}; log: {log_file}")
    d = ExecutorDaemon(broker, cpus=cpus, gpus=gpu_list, memory=mem, labels=labels, log_file=log_file)
    said = [0.0]

    def waiting(seconds):  # nothing answers yet: say so, then every 30 s, rather than hang silently
        if seconds >= 3 and seconds - said[0] >= 30 or said[0] == 0 and seconds >= 3:
            said[0] = seconds
            click.echo(f"no broker answers at {broker} yet ({seconds:.0f}s); retrying every second until one does "
                       f"(Ctrl-C to stop)", err=True)

    d.on_waiting = waiting
    signal.signal(signal.SIGTERM, lambda *_: setattr(d, "running", False))
    try:
        d.serve()
    except KeyboardInterrupt:
        pass
    except FabricError as e:  # e.g. the broker did not accept this executor's key
        raise click.ClickException(str(e)) from None


@main.command()
@_keys_option
@click.option("--address", help="broker address (default: FABRIC_ADDRESS or the cluster `fabric start` recorded)")
@click.option("--json", "as_json", is_flag=True, help="print the raw status as JSON")
def status(address, as_json):
    """Show executors, workers, resources and queue depth."""
    from .control import ClusterStatus, request

    address = _address(address)
    try:
        raw = request(address, P.STATUS, timeout=3)
        st = ClusterStatus.parse(raw)
    except FabricError as e:
        raise click.ClickException(str(e)) from None
    rec = _recorded()
    decisions = []
    if rec and rec.get("address") == address and rec.get("log_dir"):
        from .autoscale import last_decisions

        decisions = last_decisions(rec["log_dir"], 5)
    gateways = _serve_gateways(address)
    if as_json:
        click.echo(json.dumps({**raw, "autoscaler": decisions, "serve": gateways}, indent=2))
        return
    con, Table = _tables()
    con.print(f"[bold]fabric cluster[/] {st.address}  broker pid {st.pid}  up {st.uptime_s}s  "
              f"drivers {st.drivers}  pending calls {st.calls_pending}  instances {st.instances}")
    hosts: dict = {}
    for ex in st.executors:
        hosts.setdefault(ex.host, {}).setdefault(ex.kind, 0)
        hosts[ex.host][ex.kind] += 1
    t = Table(title="executors: " + ("; ".join(f"{h} {', '.join(f'{n} {k}' for k, n in sorted(ks.items()))}"
                                               for h, ks in sorted(hosts.items())) or "none"))
    for col in ("id", "host", "kind", "cpus (free)", "gpus (free)", "memory (free)", "workers", "busy",
                "instances", "labels", "last seen"):
        t.add_column(col)
    for ex in st.executors:
        labels = ",".join(f"{k}={v}" for k, v in sorted(ex.labels.items()))
        t.add_row(ex.id[:8], ex.host, ex.kind, f"{ex.cpus:g} ({ex.free_cpus:g})",
                  f"{len(ex.gpus)} ({len(ex.free_gpus)})",
                  f"{ex.memory >> 20}MiB ({ex.free_memory >> 20}MiB)", str(ex.workers), str(ex.busy),
                  str(ex.instances), labels, f"{ex.last_seen_s}s ago")
    con.print(t)
    if st.functions:
        ft = Table(title="functions and classes with min_warm / max_containers (warm: workers holding their code)")
        for col in ("name", "kind", "running", "waiting", "warm", "min_warm", "max_containers"):
            ft.add_column(col)
        for f in st.functions:
            ft.add_row(f.name, f.kind, str(f.running), str(f.waiting), str(f.warm),
                       str(f.min_warm), str(f.max_containers or "-"))
        con.print(ft)
    if st.named:
        nt = Table(title="named instances")
        for col in ("name", "namespace", "class", "lifetime", "alive", "id"):
            nt.add_column(col)
        for n in st.named:
            nt.add_row(n.name, n.namespace, n.cls, "detached" if n.detached else "driver",
                       "yes" if n.alive else "starting", n.actor[-8:])
        con.print(nt)
    q = Table(title="queues")
    for col in ("cpus", "gpus", "memory", "queued"):
        q.add_column(col)
    for row in st.queues:
        q.add_row(f"{row.cpus:g}", f"{row.gpus:g}", f"{row.memory >> 20}MiB", str(row.depth))
    con.print(q)
    if decisions:
        d = Table(title="autoscaler: last decisions")
        for col in ("time", "kind", "action", "reason"):
            d.add_column(col)
        for dec in decisions:
            when = dec.get("time")
            when = time.strftime("%H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else str(when)
            action = f"{dec.get('action', '')} {dec.get('count', '') or ''}".strip()
            d.add_row(when, str(dec.get("kind", "")), action, str(dec.get("reason", "")))
        con.print(d)
    for gw in gateways:
        g = Table(title=f"serve gateway {gw['url']} (pid {gw['pid']})")
        for col in ("deployment", "route", "status", "replicas (running/target)", "ongoing", "queued", "deaths"):
            g.add_column(col)
        for d in gw.get("deployments", []):
            g.add_row(d["name"], d["route_prefix"] or f"/v2/models/{d['name']}", d["status"],
                      f"{len(d['running_replicas'])}/{d['target_replicas']}", str(d["ongoing_requests"]),
                      str(d["queued_requests"]), str(d["replica_deaths"]))
        con.print(g)
    s = st.stats
    con.print(f"calls submitted {s.submitted}  completed {s.completed}  retried {s.retried}  "
              f"refused messages {s.refused}")


def _tables():
    """(console, Table class) for the CLI's tables, so no value is ever cut to ``88e…``: piped
    (not a terminal), as wide as the tables need, one line per row; in a terminal narrower than
    a table, cells wrap (long values fold) instead of ending in an ellipsis."""
    from rich.console import Console
    from rich.table import Table

    class _Table(Table):
        def add_column(self, *args, **kw):
            kw.setdefault("overflow", "fold")
            return super().add_column(*args, **kw)

    if sys.stdout.isatty():
        return Console(), _Table
    return Console(width=10_000, no_color=True, highlight=False), _Table


def _serve_gateways(address):
    """The serve gateways of this cluster, from the records they keep in the data folder
    (read as JSON: the core does not import fabric.serve); the admin token is left out."""
    import glob

    out = []
    for p in sorted(glob.glob(os.path.join(config.data_dir(), "serve", "gateway-*.json"))):
        try:
            with open(p) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if rec.get("broker") == address and pid_alive(rec.get("pid", 0)):
            out.append({k: v for k, v in rec.items() if k != "admin_token"})
    return out


@main.command()
@_keys_option
@click.option("--address", help="broker address (default: FABRIC_ADDRESS or the cluster `fabric start` recorded)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to listen on; beyond loopback only with FABRIC_SERVE_TOKEN or --token-file")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="file holding the bearer token clients must send (else FABRIC_SERVE_TOKEN)")
@click.option("--debug", is_flag=True, help="500 answers carry the user's traceback")
def serve(address, host, port, token_file, debug):
    """Run the HTTP serving gateway (fabric.serve) for a cluster, in the foreground; see docs/serving.md."""
    import subprocess

    address = _address(address)
    args = [sys.executable, "-m", "fabric.serve", "--address", address, "--host", host, "--port", str(port)]
    if token_file:
        args += ["--token-file", token_file]
    if debug:
        args.append("--debug")
    try:
        rc = subprocess.call(args)
    except KeyboardInterrupt:
        rc = 0
    sys.exit(rc)


@main.command()
@_keys_option
@click.option("--address", help="broker address (default: the cluster `fabric start` recorded)")
def stop(address):
    """Stop a cluster: its broker, executors and workers."""
    from .control import request

    address = _address(address)
    rec = _recorded()
    try:
        st = request(address, P.STATUS, timeout=2)
    except FabricError as e:
        _forget(address)
        raise click.ClickException(str(e)) from None
    # the cluster `fabric start` recorded, however the address is spelled (0.0.0.0, a host
    # name, one of this host's addresses): its broker is one of the recorded processes
    mine = rec is not None and (rec.get("address") == address or _started_here(st.get("pid"), rec))
    request(address, P.SHUTDOWN)
    pids = rec.get("pids", []) if mine else []
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in pids:
        if pid_alive(p):
            os.kill(p, signal.SIGKILL)
    _forget(rec["address"] if mine else address)
    click.echo(f"stopped the cluster at {address}")


def _started_here(broker_pid, rec) -> bool:
    """Is the broker answering at an address the one `fabric start` recorded (it or its
    restarting supervisor is among the recorded processes)?"""
    if not broker_pid:
        return False
    import psutil

    try:
        p = psutil.Process(broker_pid)
        return broker_pid in rec.get("pids", ()) or p.ppid() in rec.get("pids", ())
    except psutil.Error:
        return False


@main.group()
def keys():
    """CurveZMQ keys: encrypt all of a cluster's traffic and allow-list who may connect.

    Every TCP cluster uses them: by default this user's, made on first use in fabric's data
    folder, so only this user's processes get in (whoever can submit a call runs code as the
    cluster's owner; docs/security.md). Let another user in on purpose: `fabric keys add-client
    NAME --public-key THEIR_client.key` (the file their refusal names). Listening beyond loopback
    takes a keys directory given on purpose:

    \b
    On the broker's host:
      fabric keys init ~/fabric-keys        broker pair + a client pair + an executor pair
      fabric start --host 0.0.0.0 --keys ~/fabric-keys
    For each other host, make an allow-listed pair and copy its folder there:
      fabric keys add-executor gpu1 --keys ~/fabric-keys --out gpu1-keys
        (on gpu1)   fabric executor --broker tcp://BROKER:5555 --keys gpu1-keys
      fabric keys add-client alice --keys ~/fabric-keys --out alice-keys
        (for alice) FABRIC_KEYS=alice-keys python script.py   (fabric.init(address=...))
    Revoke a key: delete its file in DIR/clients/ or DIR/executors/ (applies to new connections).
    """


@keys.command("init", short_help="make a keys directory: broker, client and executor pairs")
@click.argument("directory", type=click.Path(file_okay=False))
def keys_init(directory):
    """Make a keys directory: the broker's pair, a client pair and an executor pair (both allowed)."""
    from . import security

    try:
        info = security.init_keys(directory)
    except FabricError as e:
        raise click.ClickException(str(e)) from None
    d = info["dir"]
    click.echo(f"keys written to {d} (keep it private: it holds secret keys)")
    click.echo(f"  broker public key:  {info['broker']}")
    click.echo(f"  start a cluster:    fabric start --host 0.0.0.0 --keys {d}")
    click.echo(f"  other hosts:        fabric keys add-client NAME --keys {d}   (or add-executor NAME)")


def _add_key_command(role):
    @keys.command(f"add-{role}", short_help=f"allow-list a new {role} key (makes its host's keys directory)",
                  help=f"Allow-list a new {role} key NAME; by default make its pair in a new keys "
                  f"directory (--out) to copy to that {role}'s host.")
    @click.argument("name")
    @click.option("--keys", "root", metavar="DIR", envvar="FABRIC_KEYS",
                  help="the broker's keys directory (default: $FABRIC_KEYS, else this user's default keys)")
    @click.option("--out", metavar="DIR", help="the new host's keys directory [default: ./fabric-keys-NAME]")
    @click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
                  help="allow-list this public .key file (a pair made elsewhere) instead of making a pair")
    def add(name, root, out, public_key):
        from . import security

        try:
            root = _keys_root(root)
            info = security.add_key(root, role, name, out=out, public_key=public_key)
        except FabricError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"allowed {role} key {info['public']} ({info['allowed']})")
        if info["dir"]:
            click.echo(f"  its keys directory: {info['dir']} (secret: copy it to that host privately)")
            use = (f"fabric executor --broker tcp://BROKER:PORT --keys {info['dir']}" if role == "executor"
                   else f"FABRIC_KEYS={info['dir']} python script.py")
            click.echo(f"  use it there:       {use}")
    return add


_add_key_command("client")
_add_key_command("executor")


@keys.command("show", short_help="print the public keys and the allow-list")
@click.argument("directory", required=False)
def keys_show(directory):
    """Public keys in a keys directory (default: $FABRIC_KEYS): the broker's, this host's, the allowed."""
    from . import security

    try:
        root = os.path.abspath(os.path.expanduser(directory)) if directory else _keys_root(None)
    except FabricError as e:
        raise click.ClickException(str(e)) from None
    if not os.path.isdir(root):
        raise click.ClickException(f"{root} is not a directory")
    click.echo(f"keys directory {root}")
    try:
        for name in ("broker", *security.ROLES):
            for suffix in (".key_secret", ".key"):
                path = os.path.join(root, name + suffix)
                if os.path.exists(path):
                    what = "pair" if suffix == ".key_secret" else "public key only"
                    click.echo(f"  {name + '.key':<14} {security._load(path, secret=False)[0].decode()}  ({what})")
                    break
        allowed = security.allowed_keys(root)
    except FabricError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"  allowed ({len(allowed)}):" if allowed else "  allowed: none (this is not a broker's directory)")
    for key, where in sorted(allowed.items(), key=lambda kv: kv[1]):
        click.echo(f"    {where:<28} {key.decode()}")


def _keys_root(root):
    """A keys directory given (``--keys``, ``FABRIC_KEYS``), else this user's default one."""
    from . import security

    if root and root.strip().lower() not in security.OFF:
        return os.path.abspath(os.path.expanduser(root))
    return security.ensure_default()


def _forget(address):
    rec = _recorded()
    if rec and rec.get("address") == address:
        try:
            os.unlink(config.state_file())
        except OSError:
            pass


def _port_taken(host, port):
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False




def _connect_for_apps(address):
    """Deploy and friends act as a driver of the cluster: its address, and a clear error if none answers."""
    import fabric

    try:
        addr = _address(address)
    except click.ClickException:
        if address:
            raise
        addr = None  # no cluster recorded: the embedded one, as `python app.py` would use
    try:
        fabric.init(address=addr, connect_timeout=10)
    except FabricError as e:
        raise click.ClickException(f"cannot deploy: no fabric cluster answers at {addr}: {e}") from None
    return addr


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", help="the app's name (default: the name its fabric.App was given)")
@click.option("--address", help="broker address (default: FABRIC_ADDRESS or the cluster `fabric start` recorded)")
def deploy(file, name, address):
    """Deploy the fabric.App in FILE as a new version (unchanged code keeps its version)."""
    from .apps import AppError, deploy as _deploy

    _connect_for_apps(address)
    try:
        r = _deploy(file, name=name)
    except AppError as e:
        raise click.ClickException(str(e)) from None
    what = f"version {r['version']}" + ("" if r["changed"] else " (unchanged)")
    click.echo(f"deployed app {r['app']} {what} in {r['seconds']:.1f}s")
    click.echo(f"  functions:   {', '.join(r['functions']) or '-'}")
    click.echo(f"  classes:     {', '.join(r['classes']) or '-'}")
    for n, url in r["endpoints"].items():
        click.echo(f"  endpoint {n}: {url}")
    w = r.get("warm") or {}
    if w.get("containers"):
        click.echo(f"  warm:        {', '.join(f'{n} {c}' for n, c in w['containers'].items())}"
                   + ("" if w["ready"] else " (starting)"))
    if w.get("note"):
        click.echo(f"  warm:        {w['note']}")
    click.echo(f"  call it from any client of the cluster: fabric.lookup({r['app']!r}, NAME).remote(...)")


def _registry():
    from . import storage
    from .apps import Registry

    return Registry(storage.default())


@main.command("apps")
@click.option("--json", "as_json", is_flag=True, help="print the apps as JSON")
def apps_cmd(as_json):
    """List deployed apps: name, version, deployed at, functions, classes, endpoints."""
    reg = _registry()
    rows = []
    for n in reg.names():
        cur = reg.current(n)
        man = reg.manifest(n, cur["version"])
        warm = {}
        if not cur.get("stopped"):  # min_warm: what the reconciler's keeper last saw up
            from .apps.warm import read_status

            ws = read_status(reg.store, n, cur["version"]) or {}
            for t in ("functions", "classes"):
                for fn, o in sorted(man[t].items()):
                    if o.get("min_warm"):
                        warm[fn] = {"min_warm": o["min_warm"], "warm": ((ws.get(t) or {}).get(fn) or {}).get("warm", 0)}
        rows.append({"name": n, "version": cur["version"], "stopped": cur.get("stopped", False),
                     "deployed_at": man["deployed_at"], "functions": sorted(man["functions"]),
                     "classes": sorted(man["classes"]), "endpoints": man["deployments"], "warm": warm})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no apps deployed; `fabric deploy FILE` deploys one")
        return
    for r in rows:  # one block per app: readable piped or in a narrow terminal, nothing truncated
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["deployed_at"]))
        click.echo(f"{r['name']}  version {r['version']}{'  (stopped)' if r['stopped'] else ''}  deployed {when}")
        click.echo(f"  functions: {', '.join(r['functions']) or '-'}")
        click.echo(f"  classes:   {', '.join(r['classes']) or '-'}")
        click.echo(f"  endpoints: {', '.join(f'{k} {v}' for k, v in r['endpoints'].items()) or '-'}")
        if r["warm"]:
            warm = ", ".join(f"{k} {w['warm']}/{w['min_warm']}" for k, w in r["warm"].items())
            click.echo(f"  warm:      {warm}")


@main.group()
def app():
    """One app's versions: history, rollback, stop."""


@app.command("history")
@click.argument("name")
def app_history(name):
    """Every version of app NAME, newest last."""
    from .apps import AppError

    reg = _registry()
    cur = reg.current(name)
    if cur is None:
        raise click.ClickException(f"no app named {name!r} was ever deployed (apps: {', '.join(reg.names()) or 'none'})")
    for v in reg.versions(name):
        try:
            m = reg.manifest(name, v)
        except AppError:
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["deployed_at"]))
        mark = " <- current" + (" (stopped)" if cur.get("stopped") else "") if v == cur["version"] else ""
        extra = f" (rollback to {m['rollback_of']})" if m.get("rollback_of") else ""
        click.echo(f"{v:>4}  {when}  code {m['bundle'][:12]}{extra}{mark}")


@app.command("rollback")
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--address", help="broker address")
def app_rollback(name, version, address):
    """Make VERSION (default: the one before) current again, as a new version."""
    from .apps import AppError, rollback

    reg = _registry()
    man = None
    try:
        if reg.current(name) is not None and version is not None:
            man = reg.manifest(name, version)  # a version that never existed fails before connecting
        elif reg.current(name) is None:
            raise AppError(f"no app named {name!r} was ever deployed (apps: {', '.join(reg.names()) or 'none'})")
        if man is None or man.get("deployments"):
            _connect_for_apps(address)
        v = rollback(name, version)
    except AppError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"app {name}: version {v} is version {reg.manifest(name, v)['rollback_of']} again")


@app.command("stop")
@click.argument("name")
@click.option("--address", help="broker address")
def app_stop(name, address):
    """Stop app NAME: lookups fail and its endpoints go; its versions are kept."""
    from .apps import AppError, stop as _stop

    reg = _registry()
    cur = reg.current(name)
    if cur is None:
        raise click.ClickException(f"no app named {name!r} is deployed (apps: {', '.join(reg.names()) or 'none'})")
    try:
        if reg.manifest(name, cur["version"]).get("deployments"):
            _connect_for_apps(address)
        v = _stop(name)
    except AppError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"stopped app {name} (version {v}); `fabric app rollback {name} {v}` brings it back")


@app.command("reconcile")
@click.option("--address", help="broker address")
def app_reconcile(address):
    """Deploy again the running apps' deployments the serve gateway lacks (what the reconciler
    of `fabric start --serve` does every few seconds)."""
    from .apps.reconciler import reconcile_once

    _connect_for_apps(address)
    done = reconcile_once(_registry(), log=lambda m: click.echo(m, err=True))
    click.echo(f"deployed again: {', '.join(done)}" if done else "every running app's deployments are served")


@main.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
def logs(name, follow):
    """The output of app NAME's functions and classes, from this host's executor logs: each line
    starts with the function (or Class.method) and the worker, as ``(score pid=1234) ...``."""
    import re

    reg = _registry()
    cur = reg.current(name)
    if cur is None:
        raise click.ClickException(f"no app named {name!r} is deployed (apps: {', '.join(reg.names()) or 'none'})")
    names = set()
    for v in reg.versions(name):  # a version's calls may still run, or print, after a redeploy
        man = reg.manifest(name, v)
        names |= {n.lower() for n in [*man.get("log_names", []), *man["functions"], *man["classes"]]}
    # "(score pid=12) ", "(Cart.add pid=12) ", "(train[rank 1] pid=12) "
    source = re.compile(r"\(([^\s.\[\]()]+)[^\s()]* pid=\d+\) ")
    root = os.path.join(config.data_dir(), "logs")

    def files():
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".log"))

    pos: dict = {}
    while True:
        for path in files():
            try:
                with open(path, errors="replace") as fh:
                    fh.seek(pos.get(path, 0))
                    while True:
                        line = fh.readline()
                        if not line.endswith("\n"):  # a line still being written: next round
                            break
                        m = source.match(line)
                        if m and m.group(1).lower() in names:
                            click.echo(line.rstrip("\n"))
                        pos[path] = fh.tell()
            except OSError:
                continue
        if not follow:
            return
        time.sleep(0.5)


@main.group()
def cache():
    """Cached flow stages (@fabric.fn(cache=True)) in the store."""


@cache.command("ls")
@click.argument("function", required=False)
def cache_ls(function):
    """List cached results, optionally of one FUNCTION (by name)."""
    from . import cache as _cache
    from . import storage

    keys = _cache.entries(storage.default(), function)
    for k in keys:
        click.echo(k)
    click.echo(f"{len(keys)} cached result(s) in {storage.default().url(_cache.PREFIX)}", err=True)


@cache.command("clear")
@click.argument("function", required=False)
def cache_clear(function):
    """Delete cached results (all, or one FUNCTION's): the next run computes them again."""
    from . import cache as _cache
    from . import storage

    n = _cache.clear(storage.default(), function)
    click.echo(f"deleted {n} cached result(s)" + (f" of {function}" if function else ""))

if __name__ == "__main__":
    sys.exit(main())
