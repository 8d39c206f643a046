"""Every name of fabric's API contract, used as a new user would. Runs unchanged on the
embedded cluster (no FABRIC_ADDRESS) and on a running one (FABRIC_ADDRESS=tcp://...).

    python functions/contract_demo.py
"""
import asyncio

import numpy as np

import fabric


@fabric.fn
def square(x):
    return x * x


@fabric.fn(cpus=1, gpus=0, memory="256MiB", retries=3, timeout=60, min_warm=0, max_containers=None)
def add(a, b):
    return a + b


@fabric.cls(cpus=1, gpus=0, concurrency=1)
class Counter:
    def __init__(self, start=0):
        self.n = start

    @fabric.enter
    def setup(self):
        self.ready = True

    def inc(self, k=1):
        self.n += k
        return self.n


def main():
    fabric.init()
    fut = square.remote(3)
    assert fut.result(timeout=60) == 9
    assert list(square.map(range(10))) == [x * x for x in range(10)]
    assert square.local(3) == 9
    assert square.options(cpus=1).remote(4).result() == 16
    f1, f2 = square.remote(1), square.remote(2)
    assert fabric.get(f1) == 1 and fabric.get([f1, f2], timeout=30) == [1, 4]
    done, pending = fabric.wait([f1, f2], num_returns=1, timeout=None)
    assert len(done) == 1 and len(done) + len(pending) == 2
    ref = fabric.put(np.arange(10.0))
    assert add.remote(square.remote(2), ref).result().tolist() == [4.0 + i for i in range(10)]
    assert asyncio.run(_awaited()) == 25
    c = Counter.remote(5)
    assert c.inc.remote(2).result() == 7
    fabric.kill(c)
    try:
        c.inc.remote().result(timeout=30)
    except fabric.FabricError:
        pass
    fabric.shutdown()
    print("contract ok")


async def _awaited():
    return await square.remote(5)


if __name__ == "__main__":
    main()
