"""Data and models by name, from a run config; and a run folder's config read back. What the runner
(:mod:`qkd.pipeline`) and the reader of trained models (:mod:`qkd.trained`) both build from."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qkd.config import ModelConfig, RunConfig, build_config
from qkd.data import DataBundle, build_data
from qkd.distributed import resolve_device
from qkd.errors import QKDError
from qkd.models import create_model, load_pretrained
from qkd.plugins import is_import_path
from qkd.train import rundir


def build_model(mcfg: ModelConfig, data: DataBundle) -> nn.Module:
    """A model by name (zoo, ``timm:<name>`` or import path) sized for the data, from its checkpoint if given."""
    if data.num_classes is None and not is_import_path(mcfg.name):
        raise QKDError(f"model '{mcfg.name}' needs the number of classes, which the data factory does not give; "
                       "return num_classes from it, or name a model factory by import path")  # fmt: skip
    kwargs = dict(mcfg.kwargs)
    classes = kwargs.pop("num_classes", data.num_classes)  # the config's own count wins; the run's check compares
    model = create_model(mcfg.name, classes, offered={"in_channels": data.in_channels}, **kwargs)
    if mcfg.checkpoint:
        load_pretrained(model, mcfg.checkpoint)
    return model


def data_for(cfg: RunConfig, device: str | None = None) -> DataBundle:
    """The data of a run config (on ``device``, default the config's own), seeded as the run is."""
    return build_data(cfg.data, device=resolve_device(device or cfg.device), seed=cfg.seed)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run folder was started with (a CLI run; a :func:`qkd.fit` folder has user objects)."""
    data = rundir.read_config(run_dir)
    if data.get("created_by") == rundir.PYTHON_API:
        raise QKDError(f"{run_dir} was written by qkd.fit with your own model and data; resume or load it "
                       "from Python (fit(..., out=..., resume=True))")  # fmt: skip
    return build_config(data)
