"""Run or reuse: a configured run is trained once; asking again returns what it stored.

:func:`run_or_reuse` is how studies and sweeps (``benchmarks/``) get a run's result: the summary of a finished
run folder with the same settings, or the run resumed where it was interrupted, or trained. The rules:

1. A run is identified by the settings it computes with (:func:`identity`): its config as flat dotted keys,
   without those that say where, not what (:func:`qkd.config.where_settings`: the name, device, paths,
   loader workers, evaluation batch size, ...). The same run on another machine or checkout is the same run.
2. A setting that one side lacks (added to qkd after that run was stored) is no difference while the other
   holds the setting's default: runs stored before it existed stay reusable (:func:`differences`).
3. A setting that none of the run's stages reads is no difference (:func:`unused`): the other model's section
   when no stage distils and it is not trained, ``optim.teacher_lr`` without co-study, ``optim.schedule`` with
   at most one quantized phase, ``epochs`` and ``split`` for post-training quantization (``method=ptq``), and
   ``optim`` where nothing trains.
4. A run folder of the same name that differs in any other setting is neither reused nor overwritten: that
   would report one configuration's numbers as another's. It is refused, naming the settings.

>>> summary = run_or_reuse(load_config("digits", ["name=demo", "epochs=2"]), Path("runs"))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qkd import pipeline
from qkd.config import RunConfig, where_settings
from qkd.errors import QKDError
from qkd.phases import PHASES
from qkd.train import rundir
from qkd.train.stages import Stage


def identity(cfg: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """What a run computes, as flat dotted keys: its settings without those that say where (rule 1).
    ``cfg``: a config, or an identity stored earlier (kept as it is, less any key now marked where)."""
    flat = rundir.flatten(cfg.model_dump(mode="json")) if isinstance(cfg, RunConfig) else dict(cfg)
    return {k: v for k, v in flat.items() if not rundir.matches(k, where_settings())}


def differences(
    a: RunConfig | Mapping, b: RunConfig | Mapping, ignore: set[str] | frozenset = frozenset()
) -> list[str]:
    """The settings in which two runs differ (rules 1-3): dotted keys, sorted. ``ignore``: settings or whole
    sections (``teacher``) that do not count, e.g. :func:`unused` ones."""
    a, b, default = identity(a), identity(b), identity(RunConfig())
    skip = tuple(p for s in ignore for p in (s, f"{s}."))
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k, default.get(k)) != b.get(k, default.get(k)) and not rundir.matches(k, skip))  # fmt: skip


def unused(stages: list[Stage]) -> set[str]:
    """Settings (or whole sections) that none of these stages reads (rule 3)."""
    out = set()
    roles = {s.role for s in stages}
    if not any(PHASES[s.phase].uses_teacher for s in stages):  # the other model is never built
        out |= {"teacher", "student"} - roles
    if not any(s.phase == "co_study" for s in stages):
        out.add("optim.teacher_lr")
    if sum(s.quantized for s in stages) <= 1:  # one quantized phase: one decay either way
        out.add("optim.schedule")
    if all(s.phase == "ptq" for s in stages if s.quantized):  # post-training quantization: no budget to share
        out |= {"epochs", "split"}
    if not any(s.epochs for s in stages):  # nothing trains
        out.add("optim")
    return out


def run_or_reuse(cfg: RunConfig, out: str | Path, stages: list[Stage] | None = None) -> dict:
    """The summary of run ``cfg`` in ``out / cfg.name``: read where that run finished, resumed where it was
    interrupted, trained where there is none (``stages`` default to :func:`qkd.pipeline.run_plan`). A folder
    made with other settings is refused (rule 4) with a :class:`~qkd.errors.QKDError`."""
    if not cfg.name:
        raise QKDError("a reused run needs a name (cfg.name): the folder it is looked up by")
    run_dir = Path(out) / cfg.name
    if (run_dir / "config.yaml").is_file():
        planned = rundir.saved_stages(run_dir) or stages or pipeline.run_plan(cfg)
        changed = differences(pipeline.load_run_config(run_dir), cfg, unused(planned))
        if changed:
            raise QKDError(f"{run_dir} was made with other settings ({', '.join(changed[:4])}); move it away or "
                           "choose another output folder")  # fmt: skip
        if (run_dir / "summary.json").is_file():
            return json.loads((run_dir / "summary.json").read_text())
        return pipeline.resume(run_dir)[1]
    return pipeline.run(cfg, out, stages=stages)[1]


def read_history(run_dir: str | Path) -> list[dict]:
    """A run folder's per-epoch measurements (``metrics.jsonl``), oldest first; none for a run that trained no
    epoch (``method=ptq``), which writes no such file."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
