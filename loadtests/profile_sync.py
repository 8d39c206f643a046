"""Where a sync call's time goes: CPU per call in each process, fabric beside the ZeroMQ floor.

    python loadtests/profile_sync.py [--calls 5000] [--repeat 3]

With one call in flight, the driver, broker and worker take turns, so a call's latency is about
the sum of the CPU each process spends on it (its main thread and libzmq's IO thread). This
prints that sum per process for fabric's embedded cluster and for the floor of
``shared/bench/peers.py`` (client DEALER -> broker ROUTER/ROUTER -> worker DEALER echo, no
Python work beyond moving bytes), measured with psutil over the same number of calls. The
difference between the two columns is what fabric's own code costs; docs/benchmarks.md
explains it with a native profile (``perf record -p PID``) of each process.
"""
import argparse
import multiprocessing as mp
import os
import time

import psutil

FRONT, BACK = "ipc:///tmp/fabric-profile-front", "ipc:///tmp/fabric-profile-back"


def _cpu(procs):
    out = []
    for p in procs:
        try:
            t = p.cpu_times()
            out.append(t.user + t.system)
        except psutil.Error:
            out.append(0.0)
    return out


def _report(name, p50, names, before, after, n):
    per = [(a - b) / n * 1e6 for a, b in zip(after, before)]
    parts = ", ".join(f"{k} {v:.0f}" for k, v in zip(names, per) if v >= 1)
    print(f"{name:10s} p50 {p50:5.0f} us | CPU per call (us): {parts} | total {sum(per):.0f}")


def profile_fabric(n):
    import fabric

    fabric.init(num_cpus=2)

    @fabric.fn
    def noop():
        return None

    for _ in range(500):
        noop.remote().result()
    me = psutil.Process()
    procs, names = [me], ["driver"]
    for k in me.children(recursive=True):
        try:
            cmd = k.cmdline()
        except psutil.Error:
            continue
        module = cmd[cmd.index("-m") + 1] if "-m" in cmd else ""
        names.append({"fabric.broker": "broker", "fabric.executor.worker": "worker"}.get(module, "executor"))
        procs.append(k)
    before = _cpu(procs)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        noop.remote().result()
        lat.append(time.perf_counter() - t)
    after = _cpu(procs)
    fabric.shutdown()
    lat.sort()
    _report("fabric", lat[n // 2] * 1e6, names, before, after, n)


def _floor_broker():
    import zmq

    ctx = zmq.Context()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    f.bind(FRONT)
    b.bind(BACK)
    workers, rr = [], 0
    poll = zmq.Poller()
    poll.register(f, zmq.POLLIN)
    poll.register(b, zmq.POLLIN)
    while True:
        for s, _ in poll.poll():
            if s is b:
                wid, *rest = b.recv_multipart()
                if rest[0] == b"READY":
                    workers.append(wid)
                else:
                    f.send_multipart(rest)
            else:
                cid, body = f.recv_multipart()
                b.send_multipart([workers[rr % len(workers)], cid, body])
                rr += 1


def _floor_worker():
    import zmq

    s = zmq.Context().socket(zmq.DEALER)
    s.connect(BACK)
    s.send(b"READY")
    while True:
        s.send_multipart(s.recv_multipart())


def profile_floor(n):
    import zmq

    procs = [mp.Process(target=_floor_broker, daemon=True)] + [mp.Process(target=_floor_worker, daemon=True)
                                                               for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    c = zmq.Context().socket(zmq.DEALER)
    c.connect(FRONT)
    for _ in range(500):
        c.send(b"x")
        c.recv()
    ps = [psutil.Process()] + [psutil.Process(p.pid) for p in procs]
    before = _cpu(ps)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        c.send(b"x")
        c.recv()
        lat.append(time.perf_counter() - t)
    after = _cpu(ps)
    for p in procs:
        p.terminate()
        p.join()
    c.close(linger=0)
    lat.sort()
    _report("zmq-floor", lat[n // 2] * 1e6, ["client", "broker", "worker", "worker"], before, after, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    for _ in range(a.repeat):
        profile_fabric(a.calls)
        profile_floor(a.calls)
    for path in (FRONT, BACK):
        try:
            os.unlink(path[6:])
        except OSError:
            pass


if __name__ == "__main__":
    main()
