#!/usr/bin/env bash
# GPU check (issue 13): on one GPU, in under 8 minutes, what only a GPU shows:
#   - the full-size rehearsal of ViT-B/32 and BLIP-2 (random weights, every weight format) with the
#     evaluators and methods under 16-mixed (conf/trainer/gpu.yaml) and bf16-mixed autocast,
#     one RUIR and one HUG training step, timed;
#   - uCLIP's MC dropout on 1,000 captions with ViT-L/14 and its throughput.
# Usage:
#   scripts/gpu_check.sh            on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run  the same code on the CPU with the tiny backbones (~2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PY" scripts/gpu_check.py "$@"
