"""One epoch of training or evaluation. Knows phases only through ``train_mode()`` and ``step()``."""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qkd.distributed import all_sum, average_bn_statistics, rank, world_size
from qkd.errors import Diverged, QKDError


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX, as oneDNN detects them). Without
    them oneDNN emulates bf16 and autocast makes training slower, not faster (about 11x slower for a
    ResNet-20 step on an AVX2-only AMD EPYC, measured 2026-12-01)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


@dataclass(frozen=True)
class Runtime:
    """Where and how batches run: device, memory layout, mixed precision.

    ``amp``: bf16 autocast for the training steps, on CUDA and on CPUs with native bf16 (see
    :func:`cpu_has_native_bf16`; elsewhere a warning says training stays float32). Fake quantization
    runs in float32 inside it (the quantizers take a float32 copy of their input), and so do the losses.
    Evaluation uses autocast on CUDA only: on the CPU, the accuracy reported is that of the float32 model.
    """

    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    amp: bool = False

    @property
    def precision(self) -> str:
        """What the training steps compute in: ``bfloat16`` (autocast) or ``float32``."""
        if self.amp and (self.device.type == "cuda" or (self.device.type == "cpu" and cpu_has_native_bf16())):
            return "bfloat16"
        return "float32"

    def batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            what = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
            raise QKDError(f"a batch must be an (x, y) pair of tensors, got {what}; wrap the loader to yield (x, y)")
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` moved to the device, in the memory layout (in place; returned for chaining)."""
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=layout)

    def autocast(self, training: bool = True) -> torch.autocast:
        """bf16 autocast where ``precision`` says so (bf16 needs no loss scaling); for evaluation on CUDA only."""
        on = self.precision == "bfloat16" and (training or self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)


@dataclass
class EpochState:
    """Where a training epoch stands: a stopped epoch resumes from here with the same sums and random state."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    time_s: float = 0.0
    rng: Tensor | None = None  # the CPU generator's state at the stop (CUDA generators: ``cuda_rng``)
    cuda_rng: list[Tensor] | None = None


class DivergenceGuard:
    """Stops training at a non-finite loss, or at one ``ratio`` times above both its running level (an
    exponential average) and the level it started from (so a loss that has fallen near zero may bounce).

    Losses are read back every ``every`` steps (1 on the CPU; more on a GPU, where reading waits for it).
    """

    def __init__(self, ratio: float | None = 100.0, every: int = 1) -> None:
        self.ratio, self.every = ratio, every
        self.start: float | None = None
        self.level: float | None = None
        self._pending: list[tuple[int, Tensor]] = []

    def observe(self, step: int, loss: Tensor) -> None:
        self._pending.append((step, loss.detach()))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([loss.float() for _, loss in self._pending]).tolist()
        steps = [step for step, _ in self._pending]
        self._pending = []
        for step, value in zip(steps, values):
            self._check(step, value)

    def _check(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            raise Diverged(f"loss {value} at step {step + 1}")
        if self.start is None:
            self.start = self.level = value
        level = max(self.level, self.start)
        if self.ratio is not None and value > self.ratio * level and level > 0:
            raise Diverged(f"loss {value:.4g} at step {step + 1}, over {self.ratio:g}x its level so far ({level:.4g})")
        self.level = 0.9 * self.level + 0.1 * value


def train_epoch(
    phase,
    loader: Iterable,
    schedulers: list,
    rt: Runtime,
    *,
    start: EpochState | None = None,
    stop: Callable[[], bool] | None = None,
    guard: DivergenceGuard | None = None,
    bar: tqdm | None = None,
) -> tuple[dict | None, EpochState]:
    """Run ``phase.step`` over ``loader``; schedulers step per batch. Returns mean loss and accuracy.

    ``start``: continue an epoch stopped earlier (its first ``start.step`` batches are drawn again, in the
    same order, and not trained on). ``stop()``, polled after every step, ends the epoch early: the
    metrics are then None and the state says where to continue. Sums stay on the device so the loop
    never waits for the host. ``bar`` advances by one per step and shows the guard's running loss.
    """
    state = start or EpochState()
    phase.train_mode()
    mine = rank() == 0  # a stopped epoch's sums (all ranks') restart on rank 0
    loss_sum = torch.tensor(state.loss_sum if mine else 0.0, device=rt.device)
    correct = torch.tensor(state.correct if mine else 0, device=rt.device, dtype=torch.long)
    seen, t0 = state.seen if mine else 0, time.perf_counter() - state.time_s
    batches = iter(loader)
    if state.step:
        _skip(batches, state)
    step, classes = state.step, None
    bad_inputs = torch.zeros((), dtype=torch.bool, device=rt.device)  # a NaN/inf image seen (read on divergence)
    for step, batch in enumerate(batches, start=state.step):
        x, y = rt.batch(batch)
        bad_inputs |= ~torch.isfinite(x).all()
        with rt.autocast():
            loss, logits = phase.step(x, y)
        for sched in schedulers:
            sched.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen, classes = seen + len(y), logits.shape[-1]
        loss, stopping = _agreed(loss.detach(), stop, rt.device)
        if guard is not None:
            _guarded(functools.partial(guard.observe, step, loss), bad_inputs)
        if bar is not None:
            bar.update()
            if guard is not None and guard.level is not None:  # read back every guard.every steps only
                bar.set_postfix_str(f"loss {guard.level:.4g}", refresh=False)
        if stopping:
            total, right, n = _global_sums(loss_sum, correct, seen)
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            return None, EpochState(step + 1, total, right, n, time.perf_counter() - t0, torch.get_rng_state(), cuda)
    if guard is not None:
        _guarded(guard.flush, bad_inputs)
    for model in (phase.student, phase.teacher):  # every rank ends the epoch with the same BatchNorm statistics
        if model is not None:
            average_bn_statistics(model)
    total, right, n = _global_sums(loss_sum, correct, seen)
    metrics = {"train_loss": total / max(n, 1), "train_acc": right / max(n, 1), "time_s": time.perf_counter() - t0,
               "num_classes": classes}  # fmt: skip
    return metrics, EpochState(step + 1, total, right, n, metrics["time_s"])


def _guarded(check: Callable[[], None], bad_inputs: Tensor) -> None:
    """``check()`` (the divergence guard); a divergence after NaN/inf input images says so: no rate fixes those."""
    try:
        check()
    except Diverged as e:
        if bool(bad_inputs):
            raise Diverged(f"{e} (the training images held NaN or inf values: clean the data)") from None
        raise


def _agreed(loss: Tensor, stop: Callable[[], bool] | None, device: torch.device) -> tuple[Tensor, bool]:
    """The loss and the stop decision every rank takes alike: the mean loss over ranks, and a stop asked on any
    rank (one small all-reduce per step under torchrun; nothing with one process)."""
    asked = stop is not None and stop()
    if world_size() == 1:
        return loss, asked
    both = all_sum(torch.stack([loss.float(), torch.tensor(float(asked), device=device)]))
    return both[0] / world_size(), bool(both[1] > 0)


def _global_sums(loss_sum: Tensor, correct: Tensor, seen: int) -> tuple[float, int, int]:
    sums = all_sum(torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=correct.device)]))
    return sums[0].item(), int(sums[1].item()), int(sums[2].item())


def _skip(batches: Iterator, state: EpochState) -> None:
    """Draw the batches a stopped epoch had trained on, then put the random state back as it was then."""
    for _ in itertools.islice(batches, state.step):
        pass
    if state.rng is not None:
        torch.set_rng_state(state.rng)
    if state.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)


# no_grad, not inference_mode: inference tensors carry other dispatch keys, and each such variant made the
# compiled fake-quant kernels recompile (on CUDA with autocast they hit dynamo's limit and fell back to eager)
@torch.no_grad()
def top1_accuracy(model: nn.Module, loader: Iterable, rt: Runtime) -> float:
    """Top-1 accuracy of ``model`` in eval mode; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=rt.device, dtype=torch.long)  # correct, seen
    for batch in loader:
        x, y = rt.batch(batch)
        if len(y) == 0:  # under torchrun, a rank's share of the last batch may be empty
            continue
        with rt.autocast(training=False):
            counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    model.train(was_training)
    correct, seen = all_sum(counts).tolist()  # every rank's share counted once
    return correct / max(seen, 1)


evaluate = top1_accuracy  # its old name


@torch.no_grad()
def agreement(teacher: nn.Module, student: nn.Module, loader: Iterable, rt: Runtime,
              reference: nn.Module | None = None) -> dict[str, float]:  # fmt: skip
    """How close a student is to its teacher on one split: both top-1 accuracies and the mean per-image
    ``KL(p_teacher || p_student)`` at temperature 1 (nats); with ``reference`` (another teacher, e.g. the
    one before co-study), ``kl_reference``: the same KL from it to this student."""
    models = {"teacher": teacher, "student": student} | ({"reference": reference} if reference is not None else {})
    flags = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    names = ["teacher_acc", "student_acc", "kl", "kl_reference", "seen"]
    sums = dict.fromkeys(names, torch.zeros((), device=rt.device, dtype=torch.float64))
    for batch in loader:
        x, y = rt.batch(batch)
        if len(y) == 0:
            continue
        with rt.autocast(training=False):
            logp = {k: torch.log_softmax(m(x).float(), dim=1) for k, m in models.items()}
        sums["teacher_acc"] = sums["teacher_acc"] + (logp["teacher"].argmax(1) == y).sum()
        sums["student_acc"] = sums["student_acc"] + (logp["student"].argmax(1) == y).sum()
        for k, key in (("teacher", "kl"), ("reference", "kl_reference")):
            if k in logp:
                sums[key] = sums[key] + torch.sum(logp[k].exp() * (logp[k] - logp["student"]))
        sums["seen"] = sums["seen"] + len(y)
    for k, m in models.items():
        m.train(flags[k])
    totals = dict(zip(names, all_sum(torch.stack([sums[k] for k in names])).tolist(), strict=True))
    n = max(totals.pop("seen"), 1)
    if reference is None:
        totals.pop("kl_reference")
    return {k: v / n for k, v in totals.items()}
