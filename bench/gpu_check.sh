#!/usr/bin/env bash
# The GPU path for real, on a GPU machine: the finetune stage as a Ray Train job with one GPU per worker,
# first 1 worker, then N (every GPU), bf16 autocast and channels-last; prints images/s and accuracy of each.
# Not run in CI (no GPU there). On a GPU machine without Prefect or DVC, `python -m bench.gpu_check` runs
# the same Ray job (and the pretrain and evaluate GPU code) directly. Usage, from the project root after
# `make install`:
#   bench/gpu_check.sh [N_GPUS]     (default: every GPU nvidia-smi lists)
set -euo pipefail
N=${1:-$(nvidia-smi -L | wc -l)}
BIN=$(pwd)/.venv/bin
export MDPIPE_RAY_STORAGE=${MDPIPE_RAY_STORAGE:-$(mktemp -d)}
"$BIN/mdpipe" run  # data, pretrain (CPU) as usual; then the finetune stage on GPUs
for workers in 1 "$N"; do
  "$BIN/mdpipe" stage finetune -S use_gpu=true -S num_workers="$workers" -S cpus_per_worker=2 \
      -S precision=bf16 -S channels_last=true
  "$BIN/python" - "$workers" <<'PY'
import json, sys
m = json.load(open("reports/metrics/finetune.json"))
print(f"GPUs {sys.argv[1]}: {m['images_per_s']:.0f} images/s, val_acc {m['val_acc']:.3f}, "
      f"weights max diff across workers {m['weights_max_diff_across_workers']}, fit {m['fit_wall_s']} s")
PY
done
