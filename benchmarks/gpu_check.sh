#!/usr/bin/env bash
# GPU check, under 5 minutes on one GPU: the throughput benchmark on CUDA (bf16 autocast, compiled
# kernels, channels_last) and three epochs of the CIFAR-10 W4A4 preset on CUDA. The device machine has
# no CIFAR copy and no network, so the run uses random CIFAR-shaped arrays: it checks that the
# pipeline runs on the GPU and how fast, not accuracy. Outputs go to $OUT (or ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install --quiet -e ".[bench]" 2>/dev/null || echo "brevitas not installable here: peers skipped"
$PY benchmarks/throughput.py --device cuda --amp --rounds 20 --warmup 5 --batch-size 256 \
    --json-out "$OUT/throughput-cuda.json" --no-append | tee "$OUT/throughput-cuda.md"
$PY - "$OUT/synth" <<'PYEOF'
import sys, numpy as np
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (("train", 20000), ("test", 2000)):
    np.savez(out / f"synth-{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, n))
PYEOF
$PY -m qkd run cifar10-resnet20-w4a4 data.name=npz data.root="$OUT/synth" device=cuda epochs=3 \
    teacher.train_epochs=1 student.train_epochs=1 --out "$OUT/runs" --name cuda-check 2>&1 | tail -20 | tee "$OUT/run.txt"
