#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment at <repo>/.venv:
# CPU PyTorch pinned first, then ggcomm in editable mode with its dev, benchmark and DeepSpeed
# extras (DeepSpeed without its compiled ops: DS_BUILD_OPS=0).
#   GGCOMM_TORCH   the torch requirement to install (default: torch==2.13.0)
#   PYTHON         the interpreter to build the venv from (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# An unpinned torch requirement may pull a multi-GB CUDA build: pin it before anything
# that depends on torch is resolved.
torch_req="${GGCOMM_TORCH:-torch==2.13.0}"
"${pip[@]}" "$torch_req"
# ... and keep it pinned while the rest resolves (DeepSpeed requires an unpinned torch).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_req" > "$constraints"
DS_BUILD_OPS=0 "${pip[@]}" -c "$constraints" -e ".[dev,deepspeed]"
