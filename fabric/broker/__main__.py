"""``python -m fabric.broker --address ADDR``: run a broker in the foreground.

``--journal PATH`` records accepted calls so a restarted broker loses none of them;
``--restart`` runs the broker as a child process and starts it again (same address, same
journal) whenever it dies of anything but a requested shutdown: with both, a broker killed
with SIGKILL is back within a second and its drivers and executors reconnect on their own.
"""
import argparse
import logging
import signal
import subprocess
import sys
import time

from .. import config
from .. import settings
from .core import Broker


def supervise(argv, log):
    """Run ``python -m fabric.broker ARGV`` until it exits cleanly; restart it when it dies."""
    child = None

    def forward(sig, _):
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    first = settings.get().restart_backoff  # seconds before the first restart
    restarts, backoff, quick = 0, first, 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "fabric.broker", *argv])
        code = child.wait()
        if code == 0 or code in (-signal.SIGTERM, -signal.SIGINT):
            return 0
        restarts += 1
        lived = time.monotonic() - started
        quick = quick + 1 if lived < 2 else 0
        if quick >= 10:  # it cannot even start (its address taken, a broken install): say so, stop
            log.error("the broker died %d times in a row within 2 s of starting (last: %s); giving up",
                      quick, f"signal {-code}" if code < 0 else f"exit code {code}")
            return 1
        backoff = first if lived > 30 else min(backoff * 2, 5.0)
        log.warning("the broker (pid %d) died with %s; restart %d in %.1fs", child.pid,
                    f"signal {-code}" if code < 0 else f"exit code {code}", restarts, backoff)
        time.sleep(backoff)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fabric.broker")
    ap.add_argument("--address", required=True)
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    ap.add_argument("--log-file")
    ap.add_argument("--journal", help="journal file: accepted calls survive a broker crash")
    ap.add_argument("--restart", action="store_true", help="restart the broker whenever it dies")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    config.private_umask()  # its log, journal and socket: owner-only (docs/security.md)
    logging.basicConfig(filename=a.log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s broker: %(message)s")
    if a.restart:
        return supervise([x for x in argv if x != "--restart"], logging.getLogger("fabric.broker"))
    broker = Broker(a.address, parent_pid=a.parent_pid, journal=a.journal)
    config.quiet_gc()
    broker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
