"""``python -m fabric.broker --address ADDR``: run a broker in the foreground."""
import argparse
import logging
import sys

from .core import Broker


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fabric.broker")
    ap.add_argument("--address", required=True)
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    ap.add_argument("--log-file")
    a = ap.parse_args(argv)
    logging.basicConfig(filename=a.log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s broker: %(message)s")
    Broker(a.address, parent_pid=a.parent_pid).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
