"""train/batches.py: every epoch's randomness reaches a user's DistributedSampler, and evaluation counts every
image once however the sampler pads (issue 25, items 1 and 2). The ranks of a torchrun job are simulated here by
giving each sampler its (rank, number of processes)."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from qkd.errors import QKDError
from qkd.train.batches import Batches, stage_seed


def _loader(n: int, rank: int, world: int, shuffle: bool, batch_size: int = 50, **kw) -> DataLoader:
    """Images whose label is their index, a rank's share of them as the README's torchrun recipe builds it."""
    data = TensorDataset(torch.zeros(n, 1), torch.arange(n))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, **kw)
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


def _order(batches, seed: int) -> list[int]:
    return [i for _, y in batches.epoch(seed) for i in y.tolist()]


def test_a_distributed_sampler_inside_a_dataloader_reshuffles_every_epoch_and_replays_each():
    batches = Batches(_loader(400, rank=0, world=2, shuffle=True))
    orders = [_order(batches, stage_seed(0, "s", e)) for e in range(1, 4)]
    assert len({tuple(o) for o in orders}) == 3  # a new order every epoch (on main: one order, the sampler's epoch 0)
    assert _order(batches, stage_seed(0, "s", 2)) == orders[1]  # the same epoch again (a resume): the same order
    other = Batches(_loader(400, rank=1, world=2, shuffle=True))
    assert not set(_order(other, stage_seed(0, "s", 2))) & set(orders[1])  # the ranks still split the images


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("n", "world", "batch_size"), [(389, 2, 50), (10, 4, 2), (400, 2, 64), (5, 3, 1)])
def test_evaluation_counts_every_image_once_despite_the_samplers_padding(n, world, batch_size, shuffle):
    seen = []
    for rank in range(world):
        batches = Batches(_loader(n, rank, world, shuffle, batch_size), what="val")
        seen += [i for _, y in batches.epoch(7) for i in y.tolist()]
    assert sorted(seen) == list(range(n))  # on main, 389 images over two processes counted as 390


def test_training_keeps_the_samplers_padding_and_evaluation_refuses_drop_last():
    train = Batches(_loader(389, rank=1, world=2, shuffle=False))
    assert sum(len(y) for _, y in train.epoch(0)) == 195  # equal steps on every rank: the padding trains
    with pytest.raises(QKDError, match="drop_last=True, which leaves images out of the val figures"):
        Batches(_loader(389, rank=1, world=2, shuffle=False, drop_last=True), what="val")
