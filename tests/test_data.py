"""Data layer: batched augmentation, the in-memory TensorLoader, and the named sources of build_data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SHARED_DATA
from qkd.data import DataBundle, TensorLoader, build_data, list_datasets
from qkd.data.augment import crop_at, crop_offsets, normalize, random_crop, random_flip
from qkd.data.options import SourceOptions
from qkd.data.splits import split_val, three_splits
from qkd.errors import QKDError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, c: int = 3, h: int = 6, w: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=_gen(123))


def _write_npz(path: Path, n: int, *, size: int = 8, channels: int = 3, classes: int = 3, **override) -> None:
    rng = np.random.default_rng(len(path.name) + n)
    arrays = {
        "x": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
        "y": np.arange(n, dtype=np.int64) % classes,
    }
    arrays.update(override)
    np.savez(path, **arrays)


# ---------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augmentation_keeps_shape_and_dtype(dtype: torch.dtype) -> None:
    x = _images().to(dtype)
    assert random_crop(x, 2, _gen()).shape == x.shape
    assert random_crop(x, 2, _gen()).dtype == dtype
    assert random_flip(x, _gen()).shape == x.shape
    assert random_flip(x, _gen()).dtype == dtype


def test_crop_with_zero_padding_is_identity() -> None:
    x = _images()
    assert torch.equal(random_crop(x, 0, _gen()), x)


def test_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    x, pad = _images(), 2
    dy, dx = crop_offsets(x.shape[0], pad, _gen(5))
    out = crop_at(x, pad, dy, dx)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(x.shape[0]):
        a, b = int(dy[i]), int(dx[i])
        assert torch.equal(out[i], padded[i, :, a : a + x.shape[2], b : b + x.shape[3]])
    assert int(dy.min()) >= 0 and int(dy.max()) <= 2 * pad


def test_flip_all_equals_torch_flip_and_none_is_identity() -> None:
    x = _images()
    assert torch.equal(random_flip(x, _gen(), p=1.0), torch.flip(x, dims=[-1]))
    assert torch.equal(random_flip(x, _gen(), p=0.0), x)


def test_augmentation_is_reproducible_from_the_generator() -> None:
    x = _images(64)
    assert torch.equal(random_crop(x, 4, _gen(1)), random_crop(x, 4, _gen(1)))
    assert not torch.equal(random_crop(x, 4, _gen(1)), random_crop(x, 4, _gen(2)))
    flipped = random_flip(x, _gen(1))
    assert torch.equal(flipped, random_flip(x, _gen(1)))
    changed = (flipped != x).flatten(1).any(1).float().mean().item()
    assert 0.2 < changed < 0.8  # about half flipped


def test_normalize_matches_the_definition() -> None:
    x = _images(c=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError):
        normalize(x, (0.5,), (0.5,))


# ---------------------------------------------------------------------------------------- TensorLoader


def _loader(n: int = 50, **kw) -> TensorLoader:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    defaults = dict(batch_size=8, shuffle=True, augment=True, crop_padding=1, mean=(0.0,), std=(1.0,))
    return TensorLoader(x, torch.arange(n), **{**defaults, **kw})


def _run(loader: TensorLoader, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(seed)
    return list(loader)


def test_same_seed_same_batches_and_other_seed_other_order() -> None:
    loader = _loader()
    first, again, other = _run(loader, 7), _run(loader, 7), _run(loader, 8)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other]))


def test_passes_without_set_epoch_reshuffle_and_iter_takes_the_seed() -> None:
    loader = _loader()
    a = torch.cat([y for _, y in loader])
    b = torch.cat([y for _, y in loader])
    assert not torch.equal(a, b)
    late = _loader(seed=3)
    it = iter(late)
    late.set_epoch(99)  # applies to the next pass, not to the one already started
    assert torch.equal(next(it)[1], next(iter(_loader(seed=3)))[1])


def test_every_sample_seen_once_per_epoch_and_len() -> None:
    loader = _loader(n=50, batch_size=8)
    assert len(loader) == 7 and loader.num_samples == 50
    batches = _run(loader, 0)
    assert len(batches) == 7
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys.sort().values, torch.arange(50))
    for x, y in batches:  # images travel with their labels: centre pixel == label
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(x[:, 0, 1:3, 1:3].amax((1, 2)) * 255, y.float())


def test_per_pass_draws_a_fresh_subset_each_pass_without_repeats() -> None:
    loader = _loader(n=50, batch_size=8, per_pass=20)
    assert len(loader) == 3 and loader.pass_samples == 20
    first, again, other = (torch.cat([y for _, y in _run(loader, seed)]) for seed in (0, 0, 1))
    assert len(first) == 20 and len(set(first.tolist())) == 20  # labels are the image indices: no repeats
    assert torch.equal(first, again)  # a pass is a function of its seed
    assert set(first.tolist()) != set(other.tolist())  # another pass, other images (not just another order)
    with pytest.raises(ValueError, match="shuffle"):
        _loader(n=50, shuffle=False, per_pass=20)


def test_epoch_images_option() -> None:
    b = build_data("digits", epoch_images=100)
    assert b.train.pass_samples == 100 and b.train.num_samples > 1000 and b.val.pass_samples == b.val.num_samples
    with pytest.raises(QKDError, match="epoch_images must be >= 1"):
        build_data("digits", epoch_images=0)
    with pytest.raises(QKDError, match="epoch_images applies to the in-memory sources"):
        build_data("imagefolder", "/nonexistent", epoch_images=10)


def test_drop_last_and_unshuffled_order() -> None:
    assert len(_loader(n=50, batch_size=8, drop_last=True)) == 6
    assert sum(len(y) for _, y in _loader(n=50, batch_size=8, drop_last=True)) == 48
    ys = torch.cat([y for _, y in _loader(n=50, shuffle=False, augment=False)])
    assert torch.equal(ys, torch.arange(50))


def test_cifar_sized_loader_iterates() -> None:
    """Throughput sanity, not a timing assertion: 10k CIFAR-sized images through crop + flip."""
    x = torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=_gen())
    loader = TensorLoader(
        x, torch.zeros(10_000, dtype=torch.int64), batch_size=500, shuffle=True, augment=True,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )  # fmt: skip
    count = 0
    for xb, _ in loader:
        assert xb.shape[1:] == (3, 32, 32)
        count += xb.shape[0]
    assert count == 10_000


# -------------------------------------------------------------------------------------------- sources


def test_list_datasets() -> None:
    assert {"digits", "cifar10", "cifar100", "npz", "imagefolder"} <= set(list_datasets())


def test_digits_bundle_shapes_and_splits() -> None:
    b = build_data("digits", batch_size=64, seed=0)
    assert isinstance(b, DataBundle)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 8)
    assert b.train.num_samples + b.val.num_samples == 1437 and b.test.num_samples == 360
    assert not b.train.flip and b.train.crop_padding == 0  # mirrored digits are other digits
    x, y = next(iter(b.train))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.3  # normalised with the train split's own statistics
    other = build_data("digits", seed=1)
    assert torch.equal(b.test.images, other.test.images)  # fixed test split
    assert torch.equal(b.test.labels, other.test.labels)
    assert not torch.equal(b.val.labels, other.val.labels)  # seeded val split


def test_val_split_is_disjoint_stratified_and_seeded() -> None:
    y = np.repeat(np.arange(5), 20)
    train, val = split_val(y, 0.2, seed=0)
    assert len(val) == 20 and len(set(train) & set(val)) == 0
    assert sorted([*train, *val]) == list(range(100))
    assert np.bincount(y[val]).tolist() == [4] * 5
    assert np.array_equal(val, split_val(y, 0.2, seed=0)[1])
    assert not np.array_equal(val, split_val(y, 0.2, seed=1)[1])
    assert len(split_val(y, 10, seed=0)[1]) == 10


def test_val_from_test_splits_the_test_split_once_for_every_seed() -> None:
    """val_from=test: validation is a fixed, class-balanced part of the test split, test the rest, and every
    training image trains (the split for pretrained weights that saw the whole training split)."""
    b = build_data("digits", val_from="test", val_size=100, seed=0)
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (1437, 100, 260)
    assert torch.bincount(b.val.labels).tolist() == [10] * 10
    splits = three_splits(np.arange(50) % 5, np.arange(30) % 5, SourceOptions(val_from="test", val_size=10))
    (tr_src, tr), (val_src, val), (te_src, te) = splits["train"], splits["val"], splits["test"]
    assert (tr_src, val_src, te_src) == ("train", "test", "test") and list(tr) == list(range(50))
    assert sorted([*val, *te]) == list(range(30)) and len(val) == 10  # disjoint halves of the test split
    other = build_data("digits", val_from="test", val_size=100, seed=3)
    # fixed once, whatever the seed
    assert torch.equal(b.val.images, other.val.images) and torch.equal(b.test.images, other.test.images)
    with pytest.raises(QKDError, match="val_from must be train or test"):
        build_data("digits", val_from="valid")
    with pytest.raises(QKDError, match="leaves no test images"):
        build_data("digits", val_from="test", val_size=360)


def test_digits_limit() -> None:
    b = build_data("digits", limit=100)
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (100, 100, 100)


@pytest.mark.parametrize("form", ["folder", "file"])
def test_npz_source(tmp_path: Path, form: str) -> None:
    _write_npz(tmp_path / "toy-train.npz", 60, classes=3)
    _write_npz(tmp_path / "toy-test.npz", 15, classes=3)
    root = tmp_path if form == "folder" else tmp_path / "toy-train.npz"
    b = build_data("npz", str(root), batch_size=16, val_size=12)
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 3, 8)
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (48, 12, 15)
    assert len(b.mean) == 3 and all(0.4 < m < 0.6 for m in b.mean)  # uniform noise: mean ~0.5
    assert b.train.crop_padding == 0 and not b.train.flip  # 8x8 images: no CIFAR-style augmentation
    x, _ = next(iter(b.val))
    assert x.shape == (12, 3, 8, 8)


def test_npz_classes_key_and_explicit_stats(tmp_path: Path) -> None:
    names = np.array(["a", "b", "c", "d"])
    np.savez(tmp_path / "s-train.npz", x=np.zeros((40, 32, 32, 1), np.uint8), y=np.arange(40) % 3, classes=names)
    np.savez(tmp_path / "s-test.npz", x=np.zeros((8, 32, 32, 1), np.uint8), y=np.arange(8) % 3, classes=names)
    b = build_data("npz", str(tmp_path), mean=[0.25], std=[0.5], augment=False)
    assert b.num_classes == 4 and b.mean == (0.25,) and b.std == (0.5,)
    assert b.train.crop_padding == 4 and b.train.flip  # 32x32: CIFAR-style defaults
    x, _ = next(iter(b.test))
    torch.testing.assert_close(x, torch.full_like(x, -0.5))


def _bad(tmp_path: Path, **override) -> str:
    _write_npz(tmp_path / "bad-train.npz", 10, **override)
    _write_npz(tmp_path / "bad-test.npz", 5)
    return str(tmp_path)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"x": np.zeros((10, 8, 8, 3), np.float32)}, "dtype float32"),
        ({"x": np.zeros((10, 8, 8), np.uint8)}, "shape (10, 8, 8)"),
        ({"y": np.zeros((10,), np.float64)}, "int y of shape (N,)"),
        ({"y": np.zeros((10, 1), np.int64)}, "int y of shape (N,)"),
    ],
)
def test_npz_bad_arrays_name_file_and_expectation(tmp_path: Path, override: dict, needle: str) -> None:
    with pytest.raises(QKDError) as err:
        build_data("npz", _bad(tmp_path, **override))
    assert "bad-train.npz" in str(err.value) and needle in str(err.value)
    assert "expected uint8 x of shape (N,H,W,C)" in str(err.value)


def test_npz_missing_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "k-train.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    _write_npz(tmp_path / "k-test.npz", 4)
    with pytest.raises(QKDError, match=r"k-train\.npz: missing array\(s\) x, y"):
        build_data("npz", str(tmp_path))


def test_npz_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(QKDError, match="no such file or folder: .*nowhere"):
        build_data("npz", str(tmp_path / "nowhere"))
    with pytest.raises(QKDError, match=r"exactly one \*train\*\.npz"):
        build_data("npz", str(tmp_path))
    _write_npz(tmp_path / "only-train.npz", 10)
    with pytest.raises(QKDError, match=r"expected .*only-test\.npz"):
        build_data("npz", str(tmp_path / "only-train.npz"))
    with pytest.raises(QKDError, match="needs data.root"):
        build_data("npz")


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(QKDError, match=r"unknown data set 'mnist'; valid data sets: .*cifar10.*digits"):
        build_data("mnist")


def test_wrong_mean_length_and_bad_val_size() -> None:
    with pytest.raises(QKDError, match="data.mean has 3 values but the images have 1 channels"):
        build_data("digits", mean=(0.485, 0.456, 0.406))
    with pytest.raises(QKDError, match="data.std has 2 values"):
        build_data("digits", std=(0.2, 0.2))
    with pytest.raises(QKDError, match="val_size must be a fraction below 1"):
        build_data("digits", val_size=0)
    with pytest.raises(QKDError, match="leaves no training images"):
        build_data("digits", val_size=5000)


@pytest.mark.parametrize(("name", "label"), [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")])
def test_missing_cifar_folder_without_download(tmp_path: Path, name: str, label: str) -> None:
    root = tmp_path / "no-cifar"
    with pytest.raises(QKDError) as err:
        build_data(name, str(root), download=False)
    msg = str(err.value)
    assert msg.startswith(f"no {label} data in torchvision's layout at {root}")
    assert "data.download=true" in msg


def test_imagefolder_missing_and_tiny_tree(tmp_path: Path) -> None:
    from PIL import Image

    with pytest.raises(QKDError, match="lacks the folder"):
        build_data("imagefolder", str(tmp_path))
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 30), (i * 40, 90, 200)).save(tmp_path / split / cls / f"{i}.png")
    b = build_data("imagefolder", str(tmp_path), batch_size=3, val_size=2, num_workers=0)
    assert (b.num_classes, b.in_channels, b.image_size) == (2, 3, 224)
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (6, 2, 4)
    x, y = next(iter(b.test))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 1, 1]


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-jpeg-train.npz").is_file(), reason=f"no shared CIFAR-10 npz in {SHARED_DATA}"
)
def test_shared_cifar10_npz_loads_with_limit() -> None:
    b = build_data("npz", str(SHARED_DATA / "cifar10-jpeg-train.npz"), limit=2000, batch_size=256)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 32)
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (2000, 2000, 2000)
    assert torch.bincount(b.train.labels).tolist() == [200] * 10  # stratified subsample
    assert b.train.crop_padding == 4 and b.train.flip
    assert all(abs(m - c) < 0.01 for m, c in zip(b.mean, (0.4914, 0.4822, 0.4465), strict=True))
    x, _ = next(iter(b.train))
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32


# ----- shards under torchrun: each rank's images, simulated here by setting (rank, world) --------------------
def _ranks(loader_for, world: int) -> list[list[torch.Tensor]]:
    return [[y for _, y in loader_for(r)] for r in range(world)]


def test_tensor_loader_shards_are_disjoint_equal_and_the_global_batch() -> None:
    x, y = torch.zeros(23, 1, 2, 2, dtype=torch.uint8), torch.arange(23)
    train = _ranks(lambda r: TensorLoader(x, y, batch_size=6, shuffle=True, seed=3, shard=(r, 2)), 2)
    whole = torch.cat([b for _, b in TensorLoader(x, y, batch_size=6, shuffle=True, seed=3)])
    assert [len(b) for b in train[0]] == [len(b) for b in train[1]] == [3, 3, 3, 2]  # 22 of 23: equal shares
    for step, (a, b) in enumerate(zip(*train)):  # each global batch of the one-process order, split
        assert sorted(torch.cat([a, b]).tolist()) == sorted(whole[6 * step : 6 * step + len(a) + len(b)].tolist())
    test = _ranks(lambda r: TensorLoader(x, y, batch_size=6, shard=(r, 3)), 3)
    assert sorted(torch.cat([torch.cat(t) for t in test]).tolist()) == list(range(23))  # every image once
    with pytest.raises(QKDError, match="multiple of the 4 processes"):
        TensorLoader(x, y, batch_size=6, shuffle=True, shard=(0, 4))


def test_stream_loader_shards(monkeypatch, tmp_path: Path) -> None:
    from qkd.data import stream

    data = torch.utils.data.TensorDataset(torch.zeros(21, 1), torch.arange(21))

    def loaders(r: int, shuffle: bool):
        monkeypatch.setattr(stream, "rank", lambda: r)
        monkeypatch.setattr(stream, "world_size", lambda: 2)
        return stream.StreamLoader(data, batch_size=4, shuffle=shuffle, num_workers=0, device=torch.device("cpu"))

    test = _ranks(lambda r: loaders(r, False), 2)
    assert sorted(torch.cat([torch.cat(t) for t in test]).tolist()) == list(range(21))
    train = _ranks(lambda r: loaders(r, True), 2)
    seen = [torch.cat(t).tolist() for t in train]
    assert len(seen[0]) == len(seen[1]) == 10 and not set(seen[0]) & set(seen[1])
    assert max(len(b) for b in train[0]) == 2  # the global batch of 4, two images per rank


def test_npz_of_undecoded_jpegs_decodes_to_the_same_pixels(tmp_path: Path) -> None:
    """The compact form (``jpeg`` bytes and ``offsets``, as cifar10-jpeg-bytes-*.npz) gives exactly what Pillow
    decodes, and the same bundle as the decoded arrays would."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        files = []
        for im in pixels:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=75)
            files.append(buf.getvalue())
        offsets = np.cumsum([0, *map(len, files)])
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in files])
        y = np.arange(n) % 3
        np.savez(tmp_path / f"bytes-{split}.npz", jpeg=np.frombuffer(b"".join(files), np.uint8), offsets=offsets, y=y)
        (tmp_path / "pixels").mkdir(exist_ok=True)
        np.savez(tmp_path / "pixels" / f"px-{split}.npz", x=decoded, y=y)
    a = build_data("npz", str(tmp_path / "bytes-train.npz"), val_size=6, augment=False)
    b = build_data("npz", str(tmp_path / "pixels"), val_size=6, augment=False)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert a.mean == b.mean
    np.savez(tmp_path / "bad-train.npz", jpeg=np.zeros(10, np.uint8), offsets=np.array([0, 20]), y=np.zeros(1))
    np.savez(tmp_path / "bad-test.npz", jpeg=np.zeros(10, np.uint8), offsets=np.array([0, 10]), y=np.zeros(1))
    with pytest.raises(QKDError, match="bad-train.npz: expected uint8 x"):
        build_data("npz", str(tmp_path / "bad-train.npz"))


class RandomCrops(torch.utils.data.Dataset):
    """Items made with torch's generator, as the random crops and flips of a streamed training set are."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.rand(2), i


def test_stream_loader_without_workers_draws_its_crops_from_the_pass_seed_alone() -> None:
    """With ``data.num_workers=0`` the crops come from the pass's seed, whatever torch's generator holds and
    whatever training draws from it between batches: a resumed run repeats the uninterrupted one's crops."""
    from qkd.data import stream

    def passes(global_seed: int, seed: int = 7) -> list[list]:
        loader = stream.StreamLoader(RandomCrops(), batch_size=4, shuffle=True, num_workers=0,
                                     device=torch.device("cpu"), seed=seed)  # fmt: skip
        torch.manual_seed(global_seed)
        out = []
        for _ in range(2):  # two passes, the second at the next seed, as epochs are
            out.append([])
            for x, y in loader:
                out[-1].append((x, y))
                torch.rand(global_seed + 1)  # training draws from the same generator between batches
        return out

    first, again = passes(0), passes(123)
    assert all(torch.equal(a, b) for p, q in zip(first, again) for ba, bb in zip(p, q) for a, b in zip(ba, bb))
    resumed = passes(5, seed=8)[0]  # the second pass alone, from its seed, in a fresh loader
    assert all(torch.equal(a, b) for ba, bb in zip(first[1], resumed) for a, b in zip(ba, bb))
    assert not torch.equal(first[0][0][0], first[1][0][0])  # each pass its own crops
