#!/usr/bin/env bash
# A GPU slice of the clean CIFAR-10 study (benchmarks/study.py), the top budget of issue 28: W2A2, kd and qkd,
# five seeds, 4 epochs of 50,000 images drawn afresh (200,000 images seen), 5 runs at a time (tag "gpu", so its
# cells never take the CPU cells' names). It writes the slice's own study JSON (every run's settings, summary and
# history) and a throughput line to $OUT. Back here, merge it into the CPU study and draw the curve:
#   python benchmarks/study.py merge <files_at>/cifar10-clean-gpu.json
#   python benchmarks/study.py curve --tag '' --tag gpu
#
# The device machine has no network and no shared folder: carry the JPEG bytes (55 MB), the pretrained
# ResNet-20 and the CPU study's step-0 run folder (so both machines start from the same float weights):
#   mkdir -p runs/gpu-data/weights
#   cp ../shared/data/cifar10-jpeg-bytes-*.npz runs/gpu-data/
#   cp ../shared/data/weights/resnet20-12fca82f.th runs/gpu-data/weights/
#   # then run, carrying runs/gpu-data and runs/study/fp-student-resnet20-e1:
#   OUT=$OUT bash benchmarks/gpu_study_slice.sh
# Not yet run on a GPU: no device was lent while it was written (2026-12-01, top budget 2026-12-03); how long its
# 10 runs of 1,560 steps take there is not measured, so the runs stop at LIMIT_S (every finished cell is in the JSON,
# written after each cell) and the JSON comes back either way.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-slice}
PY=${PY:-python}
DATA=${DATA:-runs/gpu-data}
JOBS=${JOBS:-5}
LIMIT_S=${LIMIT_S:-480}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install --quiet -e ".[bench]"
start=$(date +%s)
timeout "$LIMIT_S" $PY benchmarks/study.py run --study cifar10-clean-gpu --device cuda --jobs "$JOBS" \
    --data-dir "$DATA" --tag gpu --grid 2:kd,qkd:0,1,2,3,4 --epochs 4 --epoch-images 50000 2>&1 \
    | grep -v "^layer\|swapped" | tail -40 | tee "$OUT/run.txt" || echo "stopped after $LIMIT_S s" | tee -a "$OUT/run.txt"
end=$(date +%s)
cp docs/study/cifar10-clean-gpu.json "$OUT/" || { echo "no cell finished within $LIMIT_S s"; exit 1; }
$PY - "$OUT/cifar10-clean-gpu.json" "$((end - start))" <<'PYEOF' | tee "$OUT/throughput.txt"
import json, sys
store, wall = json.load(open(sys.argv[1])), float(sys.argv[2])
images = 0
for name, rec in sorted(store["runs"].items()):
    limit = rec["cell"].get("epoch_images") or rec["cell"]["train_limit"] or 50_000
    train_s = sum(h["time_s"] - h.get("eval_s", 0) for h in rec["history"])
    n = limit * len(rec["history"])
    images += n
    print(f"{name}: {n / train_s:.0f} training images/s")
print(f"whole slice: {images / wall:.0f} training images/s over {wall:.0f} s of wall time ({len(store['runs'])} runs)")
PYEOF
