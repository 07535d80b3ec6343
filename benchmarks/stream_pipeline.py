"""Streamed ImageNet-layout pipeline on the CPU: images/s per DataLoader worker at 224 px.

Writes a folder of JPEGs in ImageNet layout (CIFAR-10 images from shared/data upscaled bicubic to
500x375, ImageNet's commonest size, with luminance noise so the files reach ImageNet-like sizes, saved at
quality 90), then times:

- qkd's training loader (``build_data("imagefolder", ..., batch_size=64, augment=True)``) for each
  ``data.decode`` this machine can run (``pil`` and ``cpu``; ``cuda`` where ``torch.cuda.is_available()``,
  then the batches are served on the GPU and the timing waits for them) and ``num_workers`` 0, 1 and 2,
  after one warm-up batch per worker (each worker's first batch); the modes take turns, pass by pass, so
  that the noise of a shared machine hits them alike;
- one image at a time in this process (1 torch thread): PIL open+convert, the training transforms
  (RandomResizedCrop(224) + flip, then ToTensor + Normalize), ``torchvision.io.decode_jpeg`` on the CPU, and
  ``data.decode=cpu``'s whole training path (``torchvision.io`` decode, tensor crop, flip and normalise).

    python benchmarks/stream_pipeline.py            # writes docs/stream_pipeline.json

The generated images go to a temporary folder (or ``--root``) and are never committed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine  # noqa: E402

from qkd.data import build_data, jpeg  # noqa: E402
from qkd.data.stream import IMAGENET_MEAN, IMAGENET_STD, imagefolder_transforms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg-train.npz"


def make_folder(root: Path, classes: int, per_class: int, val_per_class: int, noise: float) -> list[Path]:
    """root/{train,val}/<class>/*.JPEG from CIFAR-10 images; returns the training files."""
    x, y = (np.load(CIFAR)[k] for k in ("x", "y"))
    rng = np.random.default_rng(0)
    files = []
    for c in range(classes):
        picks = np.flatnonzero(y == c)[: per_class + val_per_class]
        for j, i in enumerate(picks):
            split = "train" if j < per_class else "val"
            img = np.asarray(Image.fromarray(x[i]).resize((500, 375), Image.BICUBIC), dtype=np.float32)
            img = np.clip(img + rng.normal(0, noise, (375, 500, 1)), 0, 255).astype(np.uint8)
            path = root / split / f"c{c}" / f"{j:05d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, "JPEG", quality=90)
            if split == "train":
                files.append(path)
    return files


def per_image(items: list, fn, rounds: int = 3) -> float:
    """Images/s of ``fn(item)`` over all items, best of ``rounds`` passes (the least disturbed one)."""
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for item in items:
            fn(item)
        rates.append(len(items) / (time.perf_counter() - t))
    return max(rates)


def stages(files: list[Path]) -> dict[str, float]:
    """Where one image's time goes, with qkd's own training transforms."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import Compose

    train_tf, _ = imagefolder_transforms(IMAGENET_MEAN, IMAGENET_STD, augment=True)
    cpu_path = jpeg.DecodeHere(True, IMAGENET_MEAN, IMAGENET_STD)
    crop_flip, tensor_norm = Compose(train_tf.transforms[:2]), Compose(train_tf.transforms[2:])
    decoded = [Image.open(f).convert("RGB") for f in files]
    return {
        "PIL open+convert": per_image(files, lambda f: Image.open(f).convert("RGB")),
        "RandomResizedCrop+flip (on the decoded image)": per_image(decoded, crop_flip),
        "ToTensor+Normalize (on the 224 crop)": per_image([crop_flip(im) for im in decoded], tensor_norm),
        "PIL decode + all training transforms": per_image(files, lambda f: train_tf(Image.open(f).convert("RGB"))),
        "torchvision.io.decode_jpeg (CPU)": per_image(
            files, lambda f: decode_jpeg(read_file(str(f)), ImageReadMode.RGB)
        ),
        "decode=cpu: torchvision.io decode + all training transforms": per_image(files, lambda f: cpu_path(str(f))),
    }


def decode_modes() -> list[str]:
    """The ``data.decode`` modes this machine can time: ``cuda`` needs a GPU."""
    return ["pil", "cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def loader_rate(root: Path, decode: str, workers: int, batches: int) -> float:
    """Training-loader images/s (one pass; the caller keeps the best of two)."""
    device = "cuda" if decode == "cuda" else "cpu"
    data = build_data("imagefolder", root=str(root), batch_size=64, num_workers=workers, augment=True,
                      val_size=2, device=device, decode=decode)  # fmt: skip
    it = iter(data.train)
    for _ in range(max(1, workers)):  # warm-up: each worker's first batch (worker start-up, prefetch)
        next(it)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)[1])
    sync()  # decode=cuda: the batches are made on the GPU, asynchronously
    return n / (time.perf_counter() - t)


def main(
    root: Path | None = typer.Option(None, help="write the JPEGs here (default: a temporary folder)"),
    per_class: int = typer.Option(400, help="training images per class (2 classes)"),
    batches: int = typer.Option(10, help="timed batches of 64 after the warm-up"),
    noise: float = typer.Option(28.0, help="luminance noise sigma (sets the JPEG size)"),
    out: Path = typer.Option(ROOT / "docs" / "stream_pipeline.json"),
) -> None:
    if 2 * per_class - 2 < 64 * (batches + 2):
        raise typer.BadParameter(f"2 x {per_class} images hold fewer than {batches} + 2 batches of 64")
    torch.set_num_threads(1)  # per-core figures; DataLoader workers run 1 thread each anyway
    load = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure here
    with tempfile.TemporaryDirectory() as tmp:
        base = root or Path(tmp)
        files = make_folder(base, 2, per_class, 10, noise)
        size_kb = statistics.mean(f.stat().st_size for f in files) / 1024
        single = stages(files[:200])
        modes, workers = decode_modes(), (0, 1, 2)
        loader = {(m, w): 0.0 for m in modes for w in workers}
        for _ in range(2):  # two passes, the modes in turn within each; the best of the two is kept
            for m in modes:
                for w in workers:
                    loader[m, w] = max(loader[m, w], loader_rate(base, m, w, batches))
    per_worker = {(m, w): v / max(1, w) for (m, w), v in loader.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "load_average_at_start": load,
        "command": command_line(),
        "images": f"{len(files)} training JPEGs, 500x375, quality 90, mean {size_kb:.1f} KiB",
        "single_image_per_s": {k: round(v, 1) for k, v in single.items()},
        "loader_images_per_s": {m: {str(w): round(loader[m, w], 1) for w in workers} for m in modes},
        "loader_images_per_s_per_worker": {m: {str(w): round(per_worker[m, w], 1) for w in workers} for m in modes},
        "notes": "single-image rates: best of 3 passes over 200 images, 1 torch thread; loader (by data.decode, then "
        f"num_workers): best of 2 passes of {batches} batches of 64 after one warm-up batch per worker, the modes in "
        "turn; num_workers=0 decodes in the main process; decode=cuda: workers only read files and draw crops, the "
        "main process decodes (nvJPEG) and crops on the GPU, so its per-worker rate is not a decode rate",
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['images']}\n\n| stage (one image, 1 thread) | images/s | ms/image |\n|---|---:|---:|")
    for k, v in single.items():
        print(f"| {k} | {v:.0f} | {1000 / v:.2f} |")
    print("\n| data.decode | num_workers | images/s | per worker |\n|---|---:|---:|---:|")
    for (m, w), v in loader.items():
        print(f"| {m} | {w} | {v:.0f} | {per_worker[m, w]:.0f} |")


if __name__ == "__main__":
    typer.run(main)
