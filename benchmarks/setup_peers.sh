#!/usr/bin/env bash
# Install the peers the benchmarks compare against into benchmarks/.peers, a plain directory that
# only the benchmark scripts put on sys.path (benchmarks/_peers.py). Never into the package's own
# dependencies, and never with dependency resolution: each peer's bare `torch` requirement would
# otherwise pull a multi-GB CUDA build over the CPU torch already installed.
#
#   bash benchmarks/setup_peers.sh [PYTHON]        (default: .venv/bin/python, else python3)
#
# Pinned, with their pure-Python dependencies listed one by one (read from each wheel's METADATA:
# gateloop-transformer 0.2.5 needs einops>=0.7 and rotary-embedding-torch; rotary-embedding-torch
# 0.9.1 needs einops>=0.8; mingru-pytorch 0.2.1 needs nothing beyond torch). torch comes from the
# environment that runs the benchmarks.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${1:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
target="$here/.peers"
"$py" -m pip install --quiet --no-deps --upgrade --target "$target" \
    gateloop-transformer==0.2.5 \
    mingru-pytorch==0.2.1 \
    rotary-embedding-torch==0.9.1 \
    einops==0.8.2
echo '*' > "$target/.gitignore"   # the directory ignores itself: nothing of it is ever committed
"$py" - "$target" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import torch, gateloop_transformer, minGRU_pytorch  # noqa: F401  (import check only)
print(f"peers installed in {sys.argv[1]} (torch {torch.__version__})")
PY
