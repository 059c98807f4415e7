#!/usr/bin/env bash
# The GPU check, ready to run on a machine with one GPU (about 2 minutes on one large GPU once a venv
# exists): ViT-B/32 throughput with the gradient cache in bf16, peak memory per chunk size, the tiled
# loss at 64k rows, the cache's overhead (benchmarks/gpu_check.py says what each measures).
#
#   benchmarks/gpu_check.sh [OUT_DIR] [--reduced]
#
# Results: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.txt (OUT_DIR defaults to $OUT, else
# ./gpu_check_out). Without CUDA it runs the reduced CPU settings (what the tests run).
#
# Python: $PYTHON if set; else the repository's .venv when it imports torch and the package; else a
# small venv made here ($GPU_VENV, default .venv-gpu): torch (pinned by constraints.txt; on a GPU
# machine PyPI's torch==2.13.0 is the CUDA build) and the few packages the check imports; the
# package runs from this source tree. Without internet, point $WHEELHOUSE at a folder of wheels
# (pip download -d DIR ...) and nothing else is fetched; pip's own cache is used as usual.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$PWD/gpu_check_out}
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then OUT_DIR=$1; shift; fi

usable() { "$1" -c "import torch, pipeline.gradcache" >/dev/null 2>&1; }

PY=${PYTHON:-}
if [ -z "$PY" ] && [ -x "$REPO/.venv/bin/python" ] && (cd "$REPO" && usable "$REPO/.venv/bin/python"); then
  PY=$REPO/.venv/bin/python
  echo "gpu_check: using the existing venv $REPO/.venv"
fi
if [ -z "$PY" ]; then
  VENV=${GPU_VENV:-$REPO/.venv-gpu}
  PIP_SOURCE=()
  [ -n "${WHEELHOUSE:-}" ] && PIP_SOURCE=(--no-index --find-links "$WHEELHOUSE")
  if [ ! -x "$VENV/bin/python" ]; then
    echo "gpu_check: creating $VENV${WHEELHOUSE:+ from the wheels in $WHEELHOUSE}"
    python3 -m venv "$VENV"
  fi
  if ! (cd "$REPO" && usable "$VENV/bin/python"); then
    "$VENV/bin/python" -m pip install -q "${PIP_SOURCE[@]}" -c "$REPO/constraints.txt" torch==2.13.0
    "$VENV/bin/python" -m pip install -q "${PIP_SOURCE[@]}" -c "$REPO/constraints.txt" numpy pyyaml fsspec pillow \
      safetensors tokenizers tqdm braceexpand psutil
  fi
  PY=$VENV/bin/python
fi
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import sys, torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
print(f"gpu_check: python {sys.executable}, torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}")'
exec "$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUT_DIR" "$@"
