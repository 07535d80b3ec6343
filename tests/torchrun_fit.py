"""``qkd.fit`` under torchrun as the README's recipe builds it (run by tests/test_dist.py, not collected).

A user's DataLoaders with a ``DistributedSampler`` each (397 validation images: the sampler pads one rank's share
with a repeat) and a training set that records, for every image drawn, the sampler's epoch. Usage:
``torchrun --nproc_per_node 2 tests/torchrun_fit.py OUT STOP_AFTER RESUME`` (STOP_AFTER 0: run to the end).
"""

import json
import sys
from pathlib import Path

from torch.utils.data import DataLoader, Dataset, DistributedSampler

import qkd
from qkd.distributed import rank, setup, teardown

sys.path.insert(0, str(Path(__file__).parent))
from helpers import StopAfter, digits_loaders, user_models  # noqa: E402

SETTINGS = dict(method="qkd", epochs=3, pretrain={"teacher": (1, 0.3), "student": (1, 0.3)}, device="cpu",
                quant=qkd.QuantConfig(weight_bits=4, act_bits=4), runtime={"tensorboard": False})  # fmt: skip


class Recorded(Dataset):
    """A dataset that notes (the sampler's epoch, the image) for every image drawn from it."""

    def __init__(self, data: Dataset) -> None:
        self.data, self.drawn, self.sampler = data, [], None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.drawn.append((self.sampler.epoch, int(i)))
        return self.data[i]


def main(out: Path, stop_after: int, resume: bool) -> None:
    setup("cpu")  # the process group, so that the samplers know their rank
    train_data, val_data = (Recorded(loader.dataset) for loader in digits_loaders())
    loaders = []
    for data, shuffle in ((train_data, True), (val_data, False)):
        data.sampler = DistributedSampler(data, shuffle=shuffle)
        loaders.append(DataLoader(data, batch_size=50, sampler=data.sampler))
    hook = StopAfter(stop_after) if stop_after else None
    try:
        qkd.fit(*user_models(), *loaders, out=out, resume=resume, on_epoch_end=hook, **SETTINGS)
    except KeyboardInterrupt:
        pass
    (out.parent / f"{out.name}-drawn-rank{rank()}.json").write_text(json.dumps(train_data.drawn))
    teardown()  # both ranks leave the group together (exiting with it alive aborted a rank now and then)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
