"""The images' health check (Docker HEALTHCHECK, Kubernetes exec probes), by what the
container runs (FABRIC_ROLE, else guessed from PID 1's command line):

    broker    something listens on FABRIC_PORT (5555) here
    gateway   GET http://127.0.0.1:FABRIC_SERVE_PORT/v2/health/live answers 200
    executor  the broker at FABRIC_ADDRESS (or --broker) accepts a TCP connection

Exit 0 healthy, 1 not. No keys needed: it never speaks fabric's protocol."""
import os
import socket
import sys
import urllib.request


def _cmdline() -> str:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def main() -> int:
    cmd = _cmdline()
    role = os.environ.get("FABRIC_ROLE") or ("gateway" if "fabric.serve" in cmd else "executor" if " executor" in cmd
                                             else "broker" if " start" in cmd else "")
    if role == "broker":
        return 0 if _tcp("127.0.0.1", int(os.environ.get("FABRIC_PORT", "5555"))) else 1
    if role == "gateway":
        port = os.environ.get("FABRIC_SERVE_PORT", "8000")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=5) as r:
                return 0 if r.status == 200 else 1
        except OSError:
            return 1
    if role == "executor":
        addr = os.environ.get("FABRIC_ADDRESS", "")
        if "--broker" in cmd:
            addr = cmd.split("--broker", 1)[1].split()[0].lstrip("=")
        if not addr.startswith("tcp://"):
            return 1
        host, _, port = addr[len("tcp://"):].rpartition(":")
        return 0 if _tcp(host.strip("[]"), int(port)) else 1
    return 0  # a one-off command (fabric --help, a script): nothing to watch


if __name__ == "__main__":
    sys.exit(main())
