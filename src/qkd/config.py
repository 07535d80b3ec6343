"""The run configuration: typed, validated, loaded from YAML presets with ``key=value`` overrides.

>>> cfg = load_config("cifar10-resnet20-w4a4", ["quant.weight_bits=2", "epochs=10"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qkd.data.options import DataOptions
from qkd.errors import ConfigError, QKDError
from qkd.methods import METHODS, Distill
from qkd.quant.config import QuantConfig, refuse_bits_with_budget

DEVICES = "auto, cpu, cuda, cuda:N (GPU number N) or mps"
#: The built-in models and data sources, named here for ``qkd list`` without importing torch; the registries
#: (``qkd.models``, ``qkd.data.sources``) are the truth, and a test holds the two alike.
MODEL_NAMES = ("mobilenetv2_cifar", "resnet110", "resnet20", "resnet32", "resnet44", "resnet56", "tiny_cnn",
               "tiny_cnn_wide", "tiny_mlp", "tv_mobilenet_v2", "tv_resnet18", "tv_resnet34", "tv_resnet50")  # fmt: skip
DATA_NAMES = ("cifar10", "cifar100", "digits", "imagefolder", "npz")

PhaseName = Literal["self_study", "co_study", "tutor"]

#: Marks a setting that says where a run happens, not what it computes: file locations, the run's name, the
#: device, loader processes, evaluation batch size, logging. Two runs that differ only in these compute the same
#: (up to floating-point rounding). On a pydantic field: ``Field(..., json_schema_extra=WHERE)``; on a
#: dataclass field (``data``): ``field(..., metadata={"where": True})``. :func:`where_settings` lists them.
WHERE = {"where": True}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """A network: a name, optional weights to start from, optional float training first."""

    name: str = Field(description="a zoo model (qkd list), timm:<name>, or a factory by import path pkg.module:fn")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = Field(None, json_schema_extra=WHERE, description="weights to start from (a path)")
    train_epochs: int = Field(0, ge=0, description="float training (from the checkpoint if given)")
    lr: float = Field(0.05, gt=0, description="learning rate of that float training")


class OptimConfig(_Strict):
    """SGD with momentum and cosine decay; quantizer parameters in their own group."""

    lr: float = Field(0.01, gt=0, description="student learning rate")
    teacher_lr: float = Field(0.001, gt=0, description="teacher learning rate in co-study")
    quant_lr: float | None = Field(None, gt=0, description="quantizer parameters; None = lr")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    max_loss_ratio: float | None = Field(
        100.0,
        gt=1,
        description="stop as diverged at a loss this many times above its running level (None: at non-finite only)",
    )
    schedule: Literal["phase", "run"] = Field(
        "phase",
        description="cosine decay restarted in each quantized phase, or one decay across all of them",
    )


class RuntimeConfig(_Strict):
    """How fast, not what: none of these change the maths beyond floating-point rounding."""

    kernels: Literal["eager", "compiled"] = Field(
        "eager",
        description="fake-quant kernels: eager ops, or torch.compile'd fused loops (fast; compiles once)",
        json_schema_extra=WHERE,  # the two are held equal by the tests (each fused kernel has a reference twin)
    )
    channels_last: bool = Field(False, description="NHWC memory layout for conv nets (faster convs on CPU and GPU)")
    amp: bool = Field(
        False,
        description="bfloat16 autocast for training on CUDA and on CPUs with native bf16 (AVX-512 BF16/AMX; "
        "elsewhere a warning, and float32); fake quantization and losses stay float32",
    )
    eval: Literal["full", "lean"] = Field(
        "full",
        description="full: the float models before quantizing, validation after every epoch and every split at each "
        "stage end; lean (for studies of many runs): validation at stage ends and the test split at the end only",
    )
    sync_bn: bool = Field(
        False, description="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)"
    )
    tensorboard: Literal["auto", True, False] = Field(
        "auto",
        description="TensorBoard events in <run folder>/tensorboard: auto = when the tensorboard package is "
        "installed (pip install tensorboard), true = required, false = off",
        json_schema_extra=WHERE,
    )


class PhaseConfig(_Strict):
    name: PhaseName
    epochs: int = Field(ge=0)
    lr: float | None = Field(None, gt=0, description="overrides optim.lr in this phase")
    teacher_lr: float | None = Field(None, gt=0)


Method = Literal[tuple(METHODS)]


class TrainConfig(_Strict):
    """How a student is trained: method and budget, quantization, optimizer, distillation, runtime.

    What :func:`qkd.fit` takes as keyword arguments, and the part of a run config that is not data or models.
    """

    seed: int = 0
    device: str = Field("auto", description=f"{DEVICES}; auto is CUDA when present", json_schema_extra=WHERE)
    method: Method = "qkd"
    epochs: int = Field(20, ge=1, description="total budget shared by the method's phases")
    split: tuple[float, float, float] = Field(
        (0.15, 0.5, 0.35),
        description="the epochs' shares for self-study, co-study and tutoring (summing to 1); a method with fewer "
        "phases shares the epochs among its own in the same proportions",
    )
    phases: list[PhaseConfig] | None = Field(None, description="explicit phases; overrides method/epochs")
    quant: QuantConfig = Field(default_factory=QuantConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    distill: Distill = Field(default_factory=Distill)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto":
            import torch  # here, not above: reading a config needs no torch

            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError(f"'{value}' is not a device; use {DEVICES}") from None
        return value

    @model_validator(mode="after")
    def _check_split(self) -> TrainConfig:
        if any(s < 0 for s in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split must be three non-negative fractions of the epochs (self-study, "
                             f"co-study, tutor) that sum to 1, e.g. [0.15, 0.5, 0.35]; these sum to "
                             f"{sum(self.split):g}")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _check_ptq(self) -> TrainConfig:
        if self.quant.ptq != "calibrate" and (self.method != "ptq" or self.phases is not None):
            raise ValueError(f"quant.ptq={self.quant.ptq} is post-training quantization and applies to "
                             "method=ptq only (other methods train the quantized model); set method=ptq or drop "
                             "quant.ptq")  # fmt: skip
        return self


class RunConfig(TrainConfig):
    """Everything one ``qkd run`` needs: a :class:`TrainConfig` plus data and models by name.

    The defaults are the built-in digits demo.
    """

    name: str | None = Field(
        None,
        description="run folder name, inside the --out folder (default: data-model-method-time)",
        json_schema_extra=WHERE,
    )
    data: DataOptions = Field(default_factory=DataOptions)
    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(name="tiny_cnn_wide", train_epochs=15))
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(name="tiny_cnn", train_epochs=15))
    # The demo runs at 2 bits, where the phases visibly matter; the library default is 4.
    quant: QuantConfig = Field(default_factory=lambda: QuantConfig(weight_bits=2, act_bits=2))

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        # a name is one folder: "a/b" would be runs/a/b, and cli.py keeps only its last part
        if value is not None and (value in ("", ".", "..") or any(sep in value for sep in "/\\")):
            raise ValueError(
                f"'{value}' must be a single folder name (no '/' or '\\', not '.' or '..'); "
                "give the parent folder with --out"
            )
        return value

    def train_config(self) -> TrainConfig:
        """The training part alone (what the trainer takes)."""
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))


def where_settings(section: str | None = None) -> tuple[str, ...]:
    """Dotted names of the settings marked :data:`WHERE` (all, or those of one ``section``).

    They may change when a run is resumed, evaluated or exported, and are no part of a run's identity when a
    finished run is reused (:mod:`qkd.reuse`).

    >>> where_settings("data")
    ('data.root', 'data.eval_batch_size', 'data.download', 'data.num_workers', 'data.decode')
    """
    names = tuple(_marked(RunConfig))
    return names if section is None else tuple(n for n in names if n.startswith(f"{section}."))


def _marked(kind: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        for name, info in kind.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("where"):
                yield prefix + name
            else:
                yield from _marked(info.annotation, f"{prefix}{name}.")
    elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
        yield from (prefix + f.name for f in dataclasses.fields(kind) if f.metadata.get("where"))


def config_dir() -> Path:
    """Presets: ``configs/`` of a source checkout, else the copy shipped inside the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return here.parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = config_dir() / f"{source}.yaml"
    if not path.is_file():
        if source.split(".")[0] in RunConfig.model_fields:  # `qkd run epochs 5`: a setting without its "="
            raise ConfigError(f"'{source}' is a setting, not a config: settings are key=value, e.g. {source}=VALUE")
        raise ConfigError(f"config '{source}' not found; give a YAML path or a preset: {', '.join(list_presets())}")
    return read_mapping(path, f"config {path}")


def read_mapping(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    """A YAML file that must hold a mapping of keys to values; every failure is one line naming ``what``."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise QKDError(f"cannot read {what}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {str(e).splitlines()[0]}{hint}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of keys to values{hint}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. quant.weight_bits=2")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node[part] = node.get(part) or {}  # an unset optional section (quant.budget: null) starts empty
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw else None


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the key: ``quant.weight_bits: bits must be ...``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key (check the spelling; `qkd config` prints every key)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def build_config(data: dict[str, Any], kind: type[TrainConfig] = RunConfig) -> TrainConfig:
    """Validate ``data`` as a ``kind`` (a run config by default); every problem in one line."""
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(source: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A preset name or YAML path (None = built-in default), then ``key=value`` overrides."""
    # Overrides apply on top of the preset, or of the full built-in default (so that e.g.
    # ``teacher.kwargs=...`` keeps the default teacher's name and epochs).
    data = _read_yaml(source) if source else RunConfig().model_dump(mode="json")
    for item in overrides or []:
        _apply_override(data, item)
    cfg = build_config(data)
    given = [o for o in overrides or [] if o.partition("=")[0] in ("quant.weight_bits", "quant.act_bits")]
    try:  # the preset's bits give way to a budget; the user's own are refused with it
        refuse_bits_with_budget(cfg.quant.budget, given)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    unused = [o for o in overrides or [] if o.partition("=")[0] in ("epochs", "split")]
    if cfg.method == "ptq" and unused:  # a preset's epochs give way to ptq; the user's own would be ignored
        raise ConfigError(f"{' and '.join(unused)} with method=ptq: post-training quantization trains nothing, "
                          "so it would be ignored; drop it (student.train_epochs trains the float student "
                          "first)")  # fmt: skip
    return cfg


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied (validated again)."""
    data = cfg.model_dump(mode="json")
    for item in overrides:
        _apply_override(data, item)
    return build_config(data)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
