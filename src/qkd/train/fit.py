"""``qkd.fit``: the whole QKD recipe on your own model and data in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qkd.config import TrainConfig, build_config
from qkd.errors import ConfigError
from qkd.quant import QuantConfig
from qkd.quant.config import refuse_bits_with_budget
from qkd.train.measure import EvalFn
from qkd.train.precheck import check_first_batch, check_models, float_training
from qkd.train.stages import plan
from qkd.train.trainer import EpochHook, FitResult, Trainer


def fit(
    student: nn.Module,
    teacher: nn.Module | None = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    *,
    method: str = "qkd",
    epochs: int = 20,
    quant: QuantConfig | dict | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    evaluate: EvalFn | None = None,
    on_epoch_end: EpochHook | None = None,
    steps_per_epoch: int | None = None,
    pretrain: dict[str, int | tuple[int, float]] | None = None,
    **settings: Any,
) -> FitResult:
    """Quantize ``student`` and train it with ``method`` (``qkd``, ``qat``, ``kd``, ``ss+tu``, ``cs+tu``).

    ``student`` and ``teacher`` are float ``nn.Module``s (usually pretrained; the student is quantized in
    place, the teacher is trained in co-study); ``train``/``val``/``test`` are iterables of ``(x, y)``
    batches (a ``DataLoader``, a ``TensorLoader``, a list) or functions returning one (a generator
    function, then with ``steps_per_epoch``). ``val`` gives the per-epoch metric, ``test`` is only
    reported. Further keyword arguments are the other :class:`~qkd.config.TrainConfig` settings:
    ``phases=[{"name": "tutor", "epochs": 5}]`` (an explicit phase list), ``split``, ``optim={"lr": 0.01}``,
    ``distill={"temperature": 2}``, ``runtime``, ``seed``, ``device``. With ``out``, everything is written
    there (config, metrics, checkpoints, the per-layer quantization table, summary) and
    ``resume=True`` continues an interrupted run exactly. ``pretrain={"teacher": 10}`` (epochs, or
    ``(epochs, lr)``; lr 0.05 by default) trains a model in float first, for models not yet trained.

    >>> result = qkd.fit(student, teacher, train_loader, val_loader, method="qkd", epochs=30,
    ...                  quant=qkd.QuantConfig(weight_bits=4, act_bits=4), out="runs/mine")
    >>> result.summary["stages"]["3_tutor"]["val"], result.student   # accuracy, the low-bit model
    """
    check_models(student, teacher)
    if isinstance(quant, dict):
        try:
            refuse_bits_with_budget(quant.get("budget"), [k for k in ("weight_bits", "act_bits") if k in quant])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    cfg = build_config({"method": method, "epochs": epochs, "quant": quant or QuantConfig(), **settings}, TrainConfig)
    trainer = Trainer(student, teacher, train, val, test, config=cfg, stages=plan(cfg, float_training(pretrain)),
                      out=out, evaluate=evaluate,
                      on_epoch_end=on_epoch_end, steps_per_epoch=steps_per_epoch)  # fmt: skip
    check_first_batch(trainer)  # one batch through both models: a common mistake is one line, before any training
    return trainer.fit(resume=resume, overwrite=overwrite)
