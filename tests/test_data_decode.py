"""data.decode for image folders: pil (torchvision's PIL recipe), cpu (TorchCodec's decoders, else torchvision.io's,
and tensor crops in the workers) and cuda (workers read files and draw crops; the batch is decoded and cropped where
the loader serves), whose batch path is run here on the CPU: it must give what the cpu mode gives, tensor for
tensor. nvJPEG itself (decode=cuda on a GPU) cannot run here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qkd.data import build_data, jpeg, sources, stream
from qkd.errors import QKDError

TOLERANCE = 0.02  # mean |pil - cpu| in normalised units (a level of 1/255 is about 0.017 here)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny ImageNet-layout tree: smooth noisy JPEGs of a few sizes, plus a CMYK JPEG (train), an RGBA PNG
    and a grayscale JPEG (val, the test split)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = 72 + 8 * i, 96 - 6 * i
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w) + 60 * c], -1)
                img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / cls / f"{i}.jpg", quality=90)
    Image.fromarray(img).convert("CMYK").save(root / "train" / "a" / "cmyk.jpg", quality=90)
    Image.fromarray(img).convert("RGBA").save(root / "val" / "a" / "rgba.png")
    Image.fromarray(img).convert("L").save(root / "val" / "b" / "gray.jpg", quality=90)
    return root


@pytest.fixture
def gpu_path_on_cpu(monkeypatch):
    """decode=cuda with the batch finished on the CPU: the GPU path's logic, without a GPU."""
    monkeypatch.setattr(stream, "_check_gpu_decode", lambda device: None)


def _bundle(folder: Path, decode: str, workers: int = 0, **kw):
    return build_data("imagefolder", str(folder), batch_size=4, eval_batch_size=4, val_size=2,
                      num_workers=workers, decode=decode, **kw)  # fmt: skip


def _batches(loader, seed: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if seed is not None:
        torch.manual_seed(seed)  # num_workers=0: the transforms draw from this process's RNG
    return list(loader)


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_pil_mode_is_torchvisions_pil_recipe(folder: Path) -> None:
    """The default is unchanged: the test split is PIL's Resize(256), CenterCrop(224), ToTensor, Normalize."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    b = _bundle(folder, "pil")
    recipe = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(sources.IMAGENET_MEAN,
                                                                                   sources.IMAGENET_STD)])  # fmt: skip
    files = ImageFolder(str(folder / "val")).samples
    expected = torch.stack([recipe(Image.open(f).convert("RGB")) for f, _ in files])
    assert torch.equal(torch.cat([x for x, _ in b.test]), expected)
    assert b.test._finish is None and b.train._loader.collate_fn is torch.utils.data.default_collate


@pytest.mark.parametrize("split", ["train", "test"])
def test_cpu_decode_is_pils_images_to_rounding(folder: Path, split: str) -> None:
    """Same files, same seed: the same crops and flips (drawn alike), pixels within rounding of PIL's; the CMYK
    and grayscale JPEGs and the RGBA PNG come out RGB. With another seed the training batches differ widely."""
    pil, cpu = (getattr(_bundle(folder, mode), split) for mode in ("pil", "cpu"))
    a, b = _batches(pil, seed=3), _batches(cpu, seed=3)
    assert [x.shape for x, _ in a] == [x.shape for x, _ in b] and all(x.dtype == torch.float32 for x, _ in b)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, b, strict=True))
    xa, xb = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b])
    assert xb.shape[1:] == (3, 224, 224)
    assert (xa - xb).abs().mean() < TOLERANCE
    assert abs(xa.mean() - xb.mean()) < TOLERANCE and abs(xa.std() - xb.std()) < TOLERANCE  # same normalisation
    if split == "train":
        other = torch.cat([x for x, _ in _batches(cpu, seed=4)])
        assert (xa - other).abs().mean() > 10 * TOLERANCE


def test_gpu_path_finished_on_the_cpu_gives_the_cpu_modes_tensors(folder: Path, gpu_path_on_cpu) -> None:
    """decode=cuda's workers read bytes and draw crops from the header; its batch step decodes and crops: the
    same tensors as decode=cpu, through real loader workers; a pass is reproducible from the loader's seed."""
    cpu, gpu = _bundle(folder, "cpu", workers=1), _bundle(folder, "cuda", workers=1)
    assert gpu.train._finish is not None and cpu.train._finish is None
    for split in ("train", "val", "test"):
        a, b = getattr(cpu, split), getattr(gpu, split)
        a.set_epoch(5), b.set_epoch(5)
        first = _batches(b)
        assert _equal(_batches(a), first), split
        b.set_epoch(5)
        assert _equal(_batches(b), first), split  # the same seed: the same batches again
        if split == "train":
            a.set_epoch(5)
            assert _equal(_batches(a), first)  # decode=cpu, again
            b.set_epoch(6)
            assert not _equal(_batches(b), first)  # another seed: another order and other crops


def test_gpu_path_items(folder: Path) -> None:
    """Workers hand plain RGB JPEGs over as bytes (for nvJPEG) and decode the rest themselves; the crop is drawn
    from the header alike from the pixels, and finish_batch on the CPU is decode=cpu's per-image result."""
    files = sorted(folder.rglob("*.*"))
    torch.manual_seed(0)
    items = [jpeg.Prepare(train=True)(str(f)) for f in files]
    assert [it.data.dim() for it in items] == [3 if f.name in ("cmyk.jpg", "rgba.png", "gray.jpg") else 1
                                                for f in files]  # fmt: skip
    torch.manual_seed(0)
    mean, std = sources.IMAGENET_MEAN, sources.IMAGENET_STD
    per_image = torch.stack([jpeg.DecodeHere(True, mean, std)(str(f)) for f in files])
    assert torch.equal(jpeg.finish_batch(items, torch.device("cpu"), mean, std), per_image)
    assert all(it.data.dtype == torch.uint8 and it.crop is not None for it in items)


def test_decode_refusals(folder: Path) -> None:
    with pytest.raises(QKDError, match=r"^data.decode must be pil, cpu or cuda, got 'gpu'$"):
        _bundle(folder, "gpu")
    with pytest.raises(QKDError, match=r"^data.decode=cuda decodes on the GPU but this run's device is cpu; use "
                                       r"data.decode=cpu .* or pil$"):  # fmt: skip
        _bundle(folder, "cuda")
    with pytest.raises(QKDError, match="^digits is decoded once, into memory; data.decode=cpu applies to imagefolder"):
        build_data("digits", decode="cpu")
    from qkd.config import load_config

    with pytest.raises(QKDError) as err:
        load_config(None, ["data.decode=nvjpeg"])
    assert "\n" not in str(err.value) and "data.decode must be pil, cpu or cuda" in str(err.value)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    for prepare in (jpeg.Prepare(train=False), jpeg.DecodeHere(False, (0.5,) * 3, (0.5,) * 3)):
        with pytest.raises(QKDError, match=f"^{bad}: "):
            prepare(str(bad))


@pytest.mark.parametrize("decode", ["pil", "cpu", "cuda"])
def test_shards_under_torchrun_with_every_decode(folder: Path, monkeypatch, gpu_path_on_cpu, decode: str) -> None:
    """Two ranks: evaluation images rank::2 of the one-process order, training the global batch halved."""
    whole = torch.cat([x for x, _ in _bundle(folder, decode).test])
    for r in range(2):
        monkeypatch.setattr(stream, "rank", lambda r=r: r)
        monkeypatch.setattr(stream, "world_size", lambda: 2)
        b = _bundle(folder, decode)
        assert torch.equal(torch.cat([x for x, _ in b.test]), whole[r::2])
        assert [len(y) for _, y in _batches(b.train, seed=0)] == [2]  # 5 training images: 2 per rank, batch 4 / 2


def test_export_of_a_gpu_decoded_run_evaluates_on_the_cpu(folder: Path) -> None:
    """`qkd eval FILE` rebuilds the run's data on the CPU: a recorded decode=cuda becomes cpu there."""
    from qkd.export.read import data_of_export

    settings = {"name": "imagefolder", "root": str(folder), "val_size": 2, "num_workers": 0, "decode": "cuda"}
    data = data_of_export(Path("student.onnx"), {"data": settings}, [])
    assert data.test._finish is None and isinstance(data.test._loader.dataset.dataset.transform, jpeg.DecodeHere)
    data = data_of_export(Path("student.onnx"), {"data": settings}, ["data.decode=pil"])
    assert not isinstance(data.test._loader.dataset.dataset.transform, jpeg.DecodeHere)


def test_a_batch_the_gpu_decoder_refuses_is_decoded_on_the_cpu(folder: Path, monkeypatch, caplog) -> None:
    """If decode_jpeg fails on a batch (nvJPEG and an unusual JPEG), the same images come from the CPU, said once."""
    items = [jpeg.Prepare(train=False)(str(f)) for f in sorted(folder.rglob("*.jpg"))]
    assert any(it.data.dim() == 1 for it in items)
    mean, std, cpu = sources.IMAGENET_MEAN, sources.IMAGENET_STD, torch.device("cpu")
    expected = jpeg.finish_batch(items, cpu, mean, std)

    def refuses(*args, **kwargs):
        raise RuntimeError("\nnvjpeg: unsupported\nmore detail")

    chosen = jpeg.decoder()
    monkeypatch.setattr(jpeg, "decoder", lambda: chosen._replace(jpegs=refuses))
    monkeypatch.setattr(jpeg, "_fallback_logged", False)
    with caplog.at_level("WARNING", logger="qkd"):
        assert torch.equal(jpeg.finish_batch(items, cpu, mean, std), expected)
        assert torch.equal(jpeg.finish_batch(items, cpu, mean, std), expected)
    assert [r.getMessage() for r in caplog.records] == [
        "decode_jpeg on cpu failed for a batch (nvjpeg: unsupported): such batches decode on the CPU"
    ]


def _pil_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def _decode_every_file(folder: Path) -> list[torch.Tensor]:
    """Every file of the tree through decode=cpu's decoding and decode=cuda's batch step (on the CPU), with
    DeprecationWarnings raised as errors; decode=cpu's images, each checked against PIL's."""
    import warnings

    files = sorted(folder.rglob("*.*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        decoded = [jpeg.decode_cpu(jpeg.read(str(f)), str(f)) for f in files]
        items = [jpeg.Prepare(train=False)(str(f)) for f in files]
        jpeg.finish_batch(items, torch.device("cpu"), sources.IMAGENET_MEAN, sources.IMAGENET_STD)
    assert all((d.int() - _pil_rgb(f).int()).abs().max() <= 1 for d, f in zip(decoded, files, strict=True))
    return decoded


@pytest.fixture
def fresh_decoder():
    """The decoder chosen anew in the test, and again after it."""
    jpeg.decoder.cache_clear()
    yield
    jpeg.decoder.cache_clear()


def test_decoding_is_torchcodecs_not_torchvisions_deprecated_decoders(folder: Path, monkeypatch, fresh_decoder):
    """torchvision 0.29 deprecates torchvision.io's decoders for TorchCodec's: with TorchCodec installed (the dev
    extra), neither mode calls torchvision's, no DeprecationWarning is raised, and every file's pixels are PIL's
    within one grey level (CMYK, grayscale and RGBA included)."""
    pytest.importorskip("torchcodec.decoders")
    import torchvision.io

    def deprecated(*args, **kwargs):
        raise AssertionError("torchvision.io's deprecated decoder was called")

    for name in ("decode_image", "decode_jpeg"):
        monkeypatch.setattr(torchvision.io, name, deprecated)
    assert jpeg.decoder().name == "torchcodec"
    _decode_every_file(folder)


def test_without_torchcodec_torchvision_decodes_the_same_pixels_and_says_why_once(folder: Path, monkeypatch,
                                                                                   fresh_decoder, caplog):  # fmt: skip
    """TorchCodec not installed (or built for another torch): torchvision.io's decoders give the same pixels,
    their deprecation warnings hidden and the reason said once, in one line."""
    import torchvision

    expected = _decode_every_file(folder) if jpeg.decoder().name == "torchcodec" else None
    jpeg.decoder.cache_clear()
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # import torchcodec: ImportError
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    with caplog.at_level("WARNING", logger="qkd"):
        decoded = _decode_every_file(folder)
        _bundle(folder, "cpu")
    assert jpeg.decoder().name == "torchvision"
    assert expected is None or all(torch.equal(a, b) for a, b in zip(decoded, expected, strict=True))
    deprecated = tuple(int(v) for v in torchvision.__version__.split(".")[:2]) >= (0, 29)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == int(deprecated) and all("\n" not in m for m in said)
    if deprecated:
        assert said[0].startswith("data.decode: TorchCodec's image decoders are not available (import of torchcodec")
        assert "pip install torchcodec" in said[0]
