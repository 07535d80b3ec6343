#!/usr/bin/env bash
# A GPU slice of the clean CIFAR-10 study (benchmarks/study.py), sized for under 10 minutes on one GPU:
# W2A2, qat/kd/qkd, five seeds, the CPU study's budget, 5 runs at a time. It writes the slice's own study
# JSON (every run's settings, summary and history) and a throughput line to $OUT.
#
# The device machine has no network and no shared folder: carry the JPEG bytes (55 MB), the pretrained
# ResNet-20 and the CPU study's step-0 run folder (so both machines start from the same float weights):
#   mkdir -p runs/gpu-data/weights
#   cp ../shared/data/cifar10-jpeg-bytes-*.npz runs/gpu-data/
#   cp ../shared/data/weights/resnet20-12fca82f.th runs/gpu-data/weights/
#   # then run, carrying runs/gpu-data and runs/study/fp-student-resnet20-e1:
#   OUT=$OUT bash benchmarks/gpu_study_slice.sh
# Not yet run on a GPU: no device was lent while it was written (2026-12-01).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-slice}
PY=${PY:-python}
DATA=${DATA:-runs/gpu-data}
JOBS=${JOBS:-5}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install --quiet -e ".[bench]"
start=$(date +%s)
$PY benchmarks/study.py run --study cifar10-clean-gpu --device cuda --jobs "$JOBS" --data-dir "$DATA" \
    --grid 2:qat,kd,qkd:0,1,2,3,4 2>&1 | grep -v "^layer\|swapped" | tail -40 | tee "$OUT/run.txt"
end=$(date +%s)
cp docs/study/cifar10-clean-gpu.json "$OUT/"
$PY - "$OUT/cifar10-clean-gpu.json" "$((end - start))" <<'PYEOF' | tee "$OUT/throughput.txt"
import json, sys
store, wall = json.load(open(sys.argv[1])), float(sys.argv[2])
images = 0
for name, rec in sorted(store["runs"].items()):
    limit = rec["cell"]["train_limit"] or 50_000
    train_s = sum(h["time_s"] - h.get("eval_s", 0) for h in rec["history"])
    n = limit * len(rec["history"])
    images += n
    print(f"{name}: {n / train_s:.0f} training images/s")
print(f"whole slice: {images / wall:.0f} training images/s over {wall:.0f} s of wall time ({len(store['runs'])} runs)")
PYEOF
