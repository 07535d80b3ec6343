"""Before any training: the mistakes every new user makes, each said in one line.

A model class for a model, ``forward`` returning a tuple, float or one-hot labels, uint8 or 3-channel images, an
empty loader, a teacher over other classes than the student: :func:`check_first_batch` runs one batch through the
student and the teacher (eval mode, no gradients, every random state put back) and refuses what would otherwise
fail as a traceback from inside the training loop, or only after the float stages.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.quant import is_layer_like, quantization_disabled, quantized_layers
from qkd.quant.budget import plan_budget
from qkd.quant.convert import MODEL_ITSELF, own_weight_modules
from qkd.train.loop import Runtime

if TYPE_CHECKING:
    from qkd.train.trainer import Trainer

PRETRAIN_LR = 0.05  # as a model config's float training
# what a model's forward may raise on inputs it cannot take (a shape or dtype mismatch)
FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def check_models(student: Any, teacher: Any) -> None:
    """The student (and the teacher, when given) are model instances, not classes or other objects."""
    for role, model in (("student", student), ("teacher", teacher)):
        if role == "teacher" and model is None:
            continue
        if isinstance(model, type):
            raise QKDError(f"the {role} is the class {model.__name__}, not a model: pass an instance, "
                           f"e.g. {model.__name__}()")  # fmt: skip
        if not isinstance(model, nn.Module):
            raise QKDError(f"the {role} must be a torch.nn.Module, not a {type(model).__name__}")


def float_training(pretrain: dict | None) -> dict[str, tuple[int, float]]:
    """``pretrain`` (``{role: epochs}`` or ``{role: (epochs, lr)}``) as ``{role: (epochs, lr)}``, checked."""
    unknown = set(pretrain or {}) - {"teacher", "student"}
    if unknown:
        raise QKDError(f"pretrain takes 'teacher' and 'student', not {sorted(unknown)}")
    return {role: _epochs_and_lr(role, value) for role, value in (pretrain or {}).items()}


def _epochs_and_lr(role: str, value: Any) -> tuple[int, float]:
    epochs, lr = tuple(value) if isinstance(value, tuple | list) and len(value) == 2 else (value, PRETRAIN_LR)
    if _is_int(epochs) and epochs >= 0 and _is_number(lr) and lr > 0:
        return epochs, float(lr)
    hint = " (a saved model is not loaded by pretrain: load its weights into the model yourself)" if isinstance(
        value, str) else ""  # fmt: skip
    raise QKDError(f"pretrain['{role}'] takes the epochs of float training, an int >= 0 or (epochs, lr), "
                   f"not {value!r}{hint}")  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_quantizable(student: nn.Module) -> None:
    """The student holds at least one Conv/Linear layer: with none, nothing would be quantized."""
    if any(is_layer_like(m) for m in student.modules()):
        return
    own = [n or MODEL_ITSELF for n, _ in own_weight_modules(student)]
    which = f"; it computes with weights it holds itself ({', '.join(own[:3])}), which qkd cannot quantize"
    raise QKDError(f"the student has no nn.Conv2d/nn.Linear layer (nor another Conv/Linear), so there is nothing "
                   f"to quantize{which if own else ''}: build it from nn.Conv2d/nn.Linear modules")  # fmt: skip


def check_first_batch(trainer: Trainer) -> None:
    """One training batch through the student (and the teacher, where a stage uses it), before anything is
    written: the batch's form, the models' outputs and the labels, each refused in one line. The models come
    back as they were (weights, buffers, train/eval flags) and so does every random state."""
    quantized = next(quantized_layers(trainer.student), None) is not None  # by an interrupted fit: resumed
    if any(s.quantized for s in trainer.stages):
        check_quantizable(trainer.student)
    with _randomness_kept():
        torch.default_generator.manual_seed(trainer.cfg.seed)  # the CPU's only: a loader's shuffling draws from it
        x, y = _first_batch(trainer)
        _check_images(x)
        _check_labels(x, y)
        classes = _classes("student", trainer.student, x, trainer.rt)
        if trainer.cfg.quant.budget is not None and any(s.quantized for s in trainer.stages) and not quantized:
            plan_budget(trainer.student, trainer.cfg.quant, x)  # refuses a budget no allocation meets
        if trainer.teacher is not None and any(s.uses_teacher for s in trainer.stages):
            theirs = _classes("teacher", trainer.teacher, x, trainer.rt)
            if theirs != classes:
                raise QKDError(f"the teacher has {theirs} outputs and the student {classes}: distillation compares "
                               "them class by class, so give both models the same num_classes")  # fmt: skip
        _check_label_range(y, classes)


def _first_batch(trainer: Trainer) -> tuple[Tensor, Tensor]:
    batch = next(iter(trainer.train), None)
    if batch is None:
        raise QKDError("the train data gave no batch (it is empty); pass a loader with at least one batch")
    if isinstance(batch, tuple | list) and len(batch) == 2:
        for name, value in zip("xy", batch):
            if not isinstance(value, Tensor):
                raise QKDError(f"a batch must be an (x, y) pair of tensors; its {name} is a {type(value).__name__}")
    return trainer.rt.batch(batch)


@contextmanager
def _randomness_kept() -> Iterator[None]:
    """Every random state (torch's, CUDA's once started, Python's and NumPy's) as it was before the block."""
    numpy = sys.modules.get("numpy")
    py, np_state = random.getstate(), numpy.random.get_state() if numpy is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        if numpy is not None:
            numpy.random.set_state(np_state)


def _check_images(x: Tensor) -> None:
    if not x.is_floating_point():
        raise QKDError(f"the images of the first training batch are {_dtype(x)}, not floating point; convert them "
                       "in the dataset or its transform (e.g. x.float() / 255, then normalise)")  # fmt: skip
    finite = torch.isfinite(x.reshape(len(x), -1) if x.dim() else x.reshape(1, 1)).all(1)
    if not finite.all():
        bad = int((~finite).sum())
        holds = "holds" if bad == 1 else "hold"
        raise QKDError(f"{bad} of the {len(finite)} images of the first training batch {holds} NaN or inf values; "
                       "clean or drop them in the dataset (training on them ends in a diverged loss)")  # fmt: skip


def _check_labels(x: Tensor, y: Tensor) -> None:
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        hint = "take y.argmax(1) for one-hot or per-class labels" if y.dim() == 2 else "give them as y.long()"
        raise QKDError(f"the labels must be class indices, an integer tensor of shape (batch,); the first training "
                       f"batch has {_dtype(y)} labels of shape {_shape(y)}: {hint}")  # fmt: skip
    if len(y) != len(x):
        raise QKDError(f"the first training batch has {len(x)} images but {len(y)} labels; "
                       "x and y must hold one label per image")  # fmt: skip


def _check_label_range(y: Tensor, classes: int) -> None:
    if not len(y):
        return
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise QKDError(f"the first training batch holds label {low}; labels are class indices 0..{classes - 1} "
                       "(drop or relabel the images marked unlabelled)")  # fmt: skip
    if high >= classes:
        raise QKDError(f"the first training batch holds label {high}, but the student has {classes} outputs "
                       f"(classes 0..{classes - 1}); give the models num_classes={high + 1} or more, or relabel "
                       "the data from 0")  # fmt: skip


def _classes(role: str, model: nn.Module, x: Tensor, rt: Runtime) -> int:
    """The width of ``model``'s logits on ``x``; QKDError where it cannot run on ``x`` or gives no logits."""
    with _evaluating(model), quantization_disabled(model), torch.no_grad(), rt.autocast(training=False):
        try:
            out = model(x)
        except FORWARD_ERRORS as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise QKDError(f"the {role} cannot run on the first training batch, of shape {_shape(x)}"
                           f"{_first_layer(model, x)}: {first}") from e  # fmt: skip
    if not isinstance(out, Tensor):
        kind = f"a dict (keys {list(out)[:4]})" if isinstance(out, dict) else f"a {type(out).__name__}"
        raise QKDError(f"the {role}'s forward returns {kind}; qkd needs the logits alone, a tensor of shape "
                       "(batch, classes): wrap the model so that forward returns them")  # fmt: skip
    if out.dim() != 2 or len(out) != len(x):
        raise QKDError(f"the {role}'s forward returns a tensor of shape {_shape(out)} for a batch of {len(x)}; "
                       f"qkd needs logits of shape ({len(x)}, classes)")  # fmt: skip
    return out.shape[1]


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every submodule's own train/eval flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _first_layer(model: nn.Module, x: Tensor) -> str:
    """What ``model``'s first Conv/Linear layer takes, where the batch does not have it."""
    name, layer = next(((n, m) for n, m in model.named_modules() if is_layer_like(m)), ("", None))
    if isinstance(layer, nn.modules.conv._ConvNd) and x.dim() > 1 and x.shape[1] != layer.in_channels:
        return f"; its first layer '{name}' takes {layer.in_channels} input channel(s), the batch has {x.shape[1]}"
    if isinstance(layer, nn.Linear) and layer.in_features not in (x.shape[-1], x[0].numel()):
        return f"; its first layer '{name}' takes {layer.in_features} input features"
    return ""


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")
