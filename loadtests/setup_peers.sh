#!/usr/bin/env bash
# Install the peers (Ray, Dask) in a venv of their own, apart from fabric's
# environment, so ../shared/bench/peers.py can run them side by side with fabric.
#
#   bash loadtests/setup_peers.sh            # venv at $REPO/.venv-peers
#   FABRIC_PEERS_VENV=/some/dir bash loadtests/setup_peers.sh
#
# Idempotent: when the venv already imports every package, nothing is installed.
# Prints the venv's python path as its last line, e.g.
#   PY=$(bash loadtests/setup_peers.sh | tail -n1)
#   "$PY" ../shared/bench/peers.py ray --json /tmp/peer-ray.json
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FABRIC_PEERS_VENV:-$REPO/.venv-peers}"
PYTHON="${PYTHON:-python3}"

# plain `ray` (not ray[default]: no dashboard, and nothing pulls torch);
# peers.py imports ray, dask.distributed, numpy and zmq
PACKAGES=(ray "dask[distributed]" numpy pyzmq)
IMPORTS="import ray, dask, distributed, numpy, zmq"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_peers: creating venv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    echo "setup_peers: peers already installed in $VENV" >&2
else
    echo "setup_peers: installing ${PACKAGES[*]} into $VENV" >&2
    # the machine's pip config lists local mirrors that lack some of these;
    # pip warns once per such package, which says nothing: drop those lines
    "$PY" -m pip install --quiet "${PACKAGES[@]}" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
    "$PY" -c "$IMPORTS"
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "setup_peers: warning: torch was pulled into $VENV" >&2
    fi
fi

"$PY" - >&2 <<'EOF'
import dask, distributed, numpy, ray, zmq
print(f"setup_peers: ray {ray.__version__}, dask {dask.__version__}, "
      f"distributed {distributed.__version__}, numpy {numpy.__version__}, "
      f"pyzmq {zmq.__version__}")
EOF
echo "$PY"
