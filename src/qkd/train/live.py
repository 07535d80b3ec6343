"""What someone watching a run sees: a start-up banner, one progress bar per stage, TensorBoard events.

All of it on rank 0 only. Bars show on an interactive terminal only (a log file keeps one line per
epoch). TensorBoard is an optional extra (``pip install tensorboard``); ``runtime.tensorboard``
(``auto``, ``true``, ``false``) decides whether ``<run folder>/tensorboard/`` is written.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from qkd._version import __version__
from qkd.distributed import is_main_process, world_size
from qkd.errors import QKDError
from qkd.phases import PHASES
from qkd.quant import LSQQuantizer, Quantizer, quantized_layers
from qkd.train.loop import Runtime
from qkd.train.stages import Stage
from qkd.train.state import RunState

log = logging.getLogger("qkd")

INSTALL = "pip install tensorboard"
FOLDER = "tensorboard"  # inside the run folder
#: per-epoch scalars: TensorBoard tag -> key of the trainer's epoch record
EPOCH_TAGS = {"train/loss": "train_loss", "train/acc": "train_acc", "train/lr": "lr", "val/acc": "val_acc",
              "val/teacher_acc": "teacher_val_acc", "time/epoch_s": "time_s"}  # fmt: skip


# ----- terminal ----------------------------------------------------------------------------------
def show_bars() -> bool:
    return is_main_process() and sys.stderr.isatty()


def stage_bar(stage: Stage, steps_per_epoch: int, done: int = 0) -> tqdm:
    """One bar over all the training steps of a stage, so that its remaining time is the stage's; ``done``: the
    steps already trained (a resumed stage). Disabled off a terminal."""
    return tqdm(desc=stage.key, total=stage.epochs * steps_per_epoch, initial=done, unit="step", leave=False,
                dynamic_ncols=True, disable=not show_bars())  # fmt: skip


def log_above_bars() -> AbstractContextManager:
    """Log lines printed above the bar rather than through it (on a terminal)."""
    return logging_redirect_tqdm() if show_bars() else nullcontext()


def describe_stage(stage: Stage, steps_per_epoch: int) -> str:
    """``2 epochs x 14 steps, lr 0.1, quantized student, with the teacher (trained too, lr 0.001)``."""
    what = "float" if not stage.quantized else "quantized"
    if stage.phase == "ptq":
        return "no training: the student quantized and calibrated (quant.ptq), then measured"
    text = f"{_count(stage.epochs, 'epoch')} x {_count(steps_per_epoch, 'step')}, lr {stage.lr:g}, {what} {stage.role}"
    if stage.role == "student" and stage.uses_teacher:
        trains = PHASES[stage.phase].trains_teacher
        text += f", with the teacher (trained too, lr {stage.teacher_lr:g})" if trains else ", with the teacher"
    return text


def headline(what: str, rt: Runtime, run_dir: Path | None, events: bool) -> str:
    """The banner's first lines: what runs (``what``) where (``rt``, a :class:`~qkd.train.loop.Runtime`), in how
    many processes, and where it writes (TensorBoard ``events`` too)."""
    n = world_size()
    head = f"qkd {__version__}: {what} on {rt.device} in {rt.precision}, {n} process{'es' if n > 1 else ''}\n"
    if run_dir is None:
        return head + "no run folder: nothing is written"
    return head + f"run folder {run_dir}" + (f", TensorBoard events in {run_dir / FOLDER}" if events else "")


def banner(head: str, splits: dict[str, Any], stages: list[Stage], resuming_from: str | None) -> str:
    """A few lines saying what the run will do: ``head``, the data (``{split: Batches}``, train first), the
    stage plan and where a resumed run continues."""
    steps = len(splits["train"])
    lines = [head, "data: " + ", ".join(f"{k} {_size(b)}" for k, b in splits.items())]
    width = max(len(s.key) for s in stages)
    lines += [f"  {s.key:<{width}}  {describe_stage(s, steps)}" for s in stages]
    if resuming_from is not None:
        lines.append(f"resuming from {resuming_from}")
    return "\n".join(lines)


def _size(batches: Any) -> str:
    """``14 batches (1400 images)``: the images where the whole source is used and knows them."""
    try:
        text = _count(len(batches), "batch", "batches")
    except QKDError:  # a source without len(), not the training one
        return "(length unknown)"
    try:
        source = batches.source
        images = source.num_samples if hasattr(source, "num_samples") else len(source.dataset)
    except (AttributeError, TypeError):
        return text
    return text if batches.steps is not None else f"{text} ({_count(images, 'image')})"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# ----- TensorBoard -------------------------------------------------------------------------------
def tensorboard_writer(setting: bool | str, run_dir: Path | None) -> type | None:
    """The ``SummaryWriter`` class where ``runtime.tensorboard`` asks for events and they can be written, else
    None (``auto`` without the package says so at info level); ``true`` without it, or without a run folder,
    is an error. Called before anything is written."""
    if setting is False:
        return None
    if run_dir is None:
        if setting is True:
            raise QKDError("runtime.tensorboard=true writes into the run folder; pass out=... (or turn it off)")
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if setting is True:
            raise QKDError(f"runtime.tensorboard=true needs the tensorboard package: {INSTALL}") from None
        if is_main_process():
            log.info("TensorBoard events are off: the tensorboard package is not installed (%s writes them to "
                     "<run folder>/%s; runtime.tensorboard=false silences this line)", INSTALL, FOLDER)  # fmt: skip
        return None
    return SummaryWriter


def event_writer(writer: type, folder: Path | None, **kw: Any) -> Any:
    """``writer(folder, **kw)``, its event file named to sort after the folder's earlier ones. TensorBoard reads a
    folder's files in name order, and a name is ``events.out.tfevents.<second>.<host>.<pid>.<counter>``: within one
    second, a later writer of this process may sort first (counter 10 before 9), and its curves would read as a
    restart and be purged. Then (a run resumed within a second of its last start: tests, a notebook) the new file
    is dropped and made again in the next second."""
    if folder is None:
        return writer(folder, **kw)
    before = {p.name for p in Path(folder).glob("events.out.tfevents.*")}
    made = writer(str(folder), **kw)
    new = {p.name for p in Path(folder).glob("events.out.tfevents.*")} - before
    if before and new and min(new) < max(before):
        made.close()
        for name in new:
            (Path(folder) / name).unlink()
        time.sleep(max(0.0, max(int(n.split(".")[3]) for n in before) + 1 - time.time()))
        made = writer(str(folder), **kw)
    return made


class Events:
    """TensorBoard events of one run, on one step axis: the epochs of the run so far, across its stages (step 0 is
    before training; epoch ``e`` of stage ``i`` is step ``sum(epochs of the stages before i) + e``).

    A resumed run continues the curves without duplicates: its writer purges every event from the step its
    checkpoint stands at and writes that step's figures again (the last epoch, a stage that ended there); a run
    stopped inside an epoch keeps that step and purges what follows it. (TensorBoard purges at every session start
    but the first, so a new run starts one too, at step 0.)
    """

    def __init__(self, writer: type, folder: Path, stages: list[Stage], steps_per_epoch: int, *, state: RunState,
                 inside_epoch: bool, student: nn.Module) -> None:  # fmt: skip
        self.stages, self.steps_per_epoch = stages, steps_per_epoch
        self.start = list(itertools.accumulate((s.epochs for s in stages), initial=0))  # first step of each stage
        now = self.start[state.stage] + state.epoch
        self.writer = event_writer(writer, folder, purge_step=now + 1 if inside_epoch else now)
        if inside_epoch:
            return
        index = {s.key: i for i, s in enumerate(stages)}
        last = state.history[-1] if state.history else None
        if last is not None and self.start[index[last["stage"]]] + last["epoch"] == now:
            self.epoch(index[last["stage"]], last, student)
        for i, s in enumerate(stages[: state.stage]):
            if self.start[i + 1] == now:
                self.stage_end(i, state.results["stages"][s.key])

    def epoch(self, i: int, record: dict, student: nn.Module) -> None:
        """An epoch's figures (``record``, as in metrics.jsonl), the stage's index and the quantizers."""
        step = self.start[i] + record["epoch"]
        for tag, key in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        self.writer.add_scalar("run/stage", i, step)
        self.quantizers(student, step)
        self.writer.flush()

    def stage_start(self, i: int) -> None:
        stage = self.stages[i]
        text = f"**{stage.key}** ({stage.phase}): {describe_stage(stage, self.steps_per_epoch)}"
        self.writer.add_text("stages", text, self.start[i])

    def quantized(self, i: int, student: nn.Module) -> None:
        """The quantizers as calibrated, before stage ``i`` trains them."""
        self.quantizers(student, self.start[i])
        self.writer.flush()

    def stage_end(self, i: int, result: dict) -> None:
        """A stage's results: ``stage_end/<role>_<split>``, and the teacher's of co-study."""
        step, role = self.start[i + 1], self.stages[i].role
        for who, figures in ((role, result), ("teacher", result.get("teacher", {}))):
            for split in ("val", "test"):
                if split in figures:
                    self.writer.add_scalar(f"stage_end/{who}_{split}", figures[split], step)
        self.writer.flush()

    def quantizers(self, model: nn.Module, step: int) -> None:
        """Per quantized layer: ``quant/<layer>/w_step`` (LSQ) or ``w_lower``/``w_upper`` (interval), and the
        same with ``a_`` for its input; per-channel parameters as their mean over the channels."""
        tags, values = [], []
        for name, layer in quantized_layers(model):
            for kind, q in (("w", layer.weight_quant), ("a", layer.act_quant)):
                if q.bits is not None and bool(q.initialized):
                    for pname, value in _learned(q):
                        tags.append(f"quant/{name}/{kind}_{pname}")
                        values.append(value.float().mean())
        for tag, value in zip(tags, torch.stack(values).tolist() if values else []):  # one read from the device
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


def _learned(q: Quantizer) -> Iterable[tuple[str, torch.Tensor]]:
    """A quantizer's learned parameters as in use: LSQ's step (its magnitude), else the parameters themselves."""
    if isinstance(q, LSQQuantizer):
        return [("step", q.scale())]
    return [(n, p.detach()) for n, p in q.named_parameters(recurse=False)]
