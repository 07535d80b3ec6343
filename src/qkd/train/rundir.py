"""Run folders: what a run writes where, and how a later command finds it again.

A run folder holds ``config.yaml`` (the resolved settings), ``stages.json`` (the plan that ``--resume``
continues), ``metrics.jsonl`` (one line per epoch), ``quantization.json`` (every layer's bits),
``checkpoints/`` (``last.pt`` after every epoch and on a graceful stop, ``previous.pt`` the one before
it, ``<stage>.pt`` at every stage boundary; each carries the settings and a checksum),
``tensorboard/`` (event files, where ``runtime.tensorboard`` and the installed packages allow) and
``summary.json`` when the run is finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from qkd.checkpoint import load_checkpoint, write_json, write_text
from qkd.config import read_mapping, where_settings
from qkd.errors import QKDError
from qkd.train.stages import Stage

log = logging.getLogger("qkd")

#: ``config.yaml`` of a run started from Python with user objects: it cannot be rebuilt from names.
PYTHON_API = "qkd.fit"


def check_new(run_dir: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty run folder unless ``overwrite``, and one that cannot be written. Writes nothing."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise QKDError(f"run folder {run_dir} is a file; pick another --name or --out")
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise QKDError(
                f"run folder {run_dir} exists; resume it with --resume {run_dir} (fit(..., resume=True) from Python), "
                "pick another name, or pass --overwrite"
            )
        _check_writable(run_dir)
    except OSError as e:  # e.g. a parent folder that may not be searched
        raise QKDError(f"cannot use run folder {run_dir}: {e.strerror or e}; choose another --out") from None


def _check_writable(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists (where it will be made), must be writable."""
    here = next(p for p in (run_dir, *run_dir.parents) if p.exists())  # "." or "/" at worst
    if not here.is_dir():
        raise QKDError(f"cannot make run folder {run_dir}: {here} is a file, not a folder; choose another --out")
    if not os.access(here, os.W_OK | os.X_OK):
        raise QKDError(f"cannot write run folder {run_dir}: {here} is not writable; choose another --out")


def init(run_dir: Path, config: dict[str, Any], stages: list[Stage]) -> None:
    """Create (or, after an explicit overwrite, empty) ``run_dir`` and write its config and plan."""
    try:
        if run_dir.exists():
            for f in sorted(run_dir.rglob("*"), reverse=True):
                f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(yaml.safe_dump(config, sort_keys=False), run_dir / "config.yaml")
        write_json([asdict(s) for s in stages], run_dir / "stages.json")
    except OSError as e:
        raise QKDError(f"cannot write run folder {run_dir}: {e.strerror or e}; choose another --out") from None


def start(run_dir: Path, overwrite: bool, config: dict[str, Any], stages: list[Stage], models: list) -> None:
    """A new run's folder: refused where it is taken (unless ``overwrite``) or lacks room for ``models``' checkpoints;
    then made, with its config and plan."""
    check_new(run_dir, overwrite)
    check_room(run_dir, models, len(stages))
    init(run_dir, config, stages)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The raw ``config.yaml`` of a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise QKDError(f"{run_dir} is not a run folder (no config.yaml)")
    return read_mapping(path, str(path), "; is this a run folder?")


def saved_stages(run_dir: Path) -> list[Stage] | None:
    """The stages a run folder was started with (``stages.json``), or None for a folder without one."""
    path = run_dir / "stages.json"
    if not path.is_file():
        return None
    try:
        return [Stage(**s) for s in json.loads(path.read_text())]
    except OSError as e:
        raise QKDError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, TypeError) as e:  # not JSON, or not a list of stages
        raise QKDError(f"{path} is not a list of stages ({e}); is this a run folder of this qkd?") from None


def final_checkpoint(run_dir: Path, role: str = "student") -> Path:
    """A run folder's ``last.pt``, or, where that was deleted (it also holds the optimizer state and is
    several times larger), the checkpoint of the last stage that trained ``role`` (never an earlier one)."""
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last.pt").is_file():
        return ckpts / "last.pt"
    final = [s.key for s in saved_stages(run_dir) or [] if s.role == role][-1:]
    if final and (ckpts / f"{final[0]}.pt").is_file():
        return ckpts / f"{final[0]}.pt"
    raise QKDError(f"{ckpts} holds no {role} checkpoint (last.pt or a finished stage's): is the run finished?")


# ----- resuming: the newest intact checkpoint, settings that may change, stale exports ---------------
PREVIOUS = "previous.pt"  # the last.pt before the newest, kept so that a damaged last.pt is not the end
#: settings a resumed run may change: they touch neither the models, the data, nor the plan's shape (the learning
#: rates, distillation and runtime, and every setting that says where, not what: ``qkd.config.where_settings``)
RESUMABLE = ("optim.lr", "optim.teacher_lr", "optim.quant_lr", "optim.momentum", "optim.nesterov",
             "optim.weight_decay", "optim.max_loss_ratio", "distill.", "runtime.", *where_settings())  # fmt: skip


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as flat dotted keys: ``{"quant": {"weight_bits": 2}}`` -> ``{"quant.weight_bits": 2}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):  # an empty section has no settings (kwargs={} and kwargs unset are the same)
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(saved: dict, now: dict) -> dict[str, tuple]:
    """``{dotted key: (saved, now)}`` for every setting that differs."""
    a, b = flatten(saved), flatten(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def matches(key: str, patterns: tuple[str, ...]) -> bool:
    """``key`` is one of ``patterns``, or under one ending with a dot (``optim.`` covers ``optim.lr``)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def may_change_on_resume(key: str) -> bool:
    return matches(key, RESUMABLE)


def write_settings(run_dir: Path, config: dict[str, Any], stages: list[Stage]) -> None:
    """Replace the settings of a run resumed with changes (the change itself is in its checkpoints and summary)."""
    write_text(yaml.safe_dump(config, sort_keys=False), run_dir / "config.yaml")
    write_json([asdict(s) for s in stages], run_dir / "stages.json")


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl``: one line per epoch, as the trainer records it."""
    write_text("".join(json.dumps(r) + "\n" for r in history), run_dir / "metrics.jsonl")


#: the key of a stage-boundary checkpoint (``<stage>.pt``) that holds the run as ``last.pt`` held it then (less
#: the optimizer state, which the next stage makes anew): where ``last.pt`` and ``previous.pt`` are both damaged,
#: the run resumes from the latest stage boundary
SNAPSHOT = "snapshot"
DAMAGED = ".damaged"  # the suffix a damaged snapshot is kept under, out of the rotation into previous.pt


def last_intact_checkpoint(run_dir: Path) -> dict | None:
    """The newest readable, checksum-valid snapshot (``last.pt``, else ``previous.pt``, else the latest stage
    boundary's, also where the first two were deleted), or None where the run saved none yet. Temporary files of a
    write that was cut short are removed. A damaged ``last.pt`` or ``previous.pt`` is kept as ``last.pt.damaged``:
    the next save keeps the ``last.pt`` it replaces as ``previous.pt``, and must never keep a damaged one there in
    place of an intact one."""
    ckpts = run_dir / "checkpoints"
    for tmp in ckpts.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    problems: dict[str, str] = {}  # file name -> what is wrong with it (damaged, or missing)
    found = next((c for c in (_snapshot(ckpts / n, problems) for n in ("last.pt", PREVIOUS)) if c), None)
    if found is None and not problems and any(ckpts.glob("*.pt")):  # both deleted: not a run to start again
        problems["last.pt"] = f"{ckpts} holds neither last.pt nor {PREVIOUS}"
    if found is None and problems:
        found = _stage_snapshot(run_dir, problems)
    if problems:
        _set_aside(ckpts, problems, found)
    return found[1] if found is not None else None


def _snapshot(path: Path, problems: dict[str, str]) -> tuple[str, dict] | None:
    """``(file name, snapshot)`` of an intact file; None where there is none (what is wrong added to ``problems``)."""
    if not path.is_file():
        return None
    try:
        return path.name, load_checkpoint(path)
    except QKDError as e:
        problems[path.name] = str(e)
        return None


def _stage_snapshot(run_dir: Path, problems: dict[str, str]) -> tuple[str, dict] | None:
    """The snapshot in the latest intact stage-boundary checkpoint that holds one (those written before they
    held it have the stage's model alone), as ``(file name, snapshot)``; None where no such file is left."""
    for stage in reversed(saved_stages(run_dir) or []):
        found = _snapshot(run_dir / "checkpoints" / f"{stage.key}.pt", problems)
        if found is not None and SNAPSHOT in found[1] and _of_this_run(run_dir, found[1][SNAPSHOT]):
            return found[0], found[1][SNAPSHOT]
    return None


def _of_this_run(run_dir: Path, snapshot: dict) -> bool:
    """A stage checkpoint copied in from another run holds that run's snapshot, not one to continue this run
    from: its settings may differ from the folder's only where a resume may change them."""
    changed = changed_settings(read_config(run_dir), snapshot.get("qkd", {}).get("config") or {})
    return all(may_change_on_resume(k) for k in changed)


def _set_aside(ckpts: Path, problems: dict[str, str], found: tuple[str, dict] | None) -> None:
    """Say in one line what is damaged and what the run resumes from, and keep the damaged snapshots as
    ``<name>.damaged``; refuse, changing nothing, where no intact snapshot is left."""
    said = "; ".join(problems.values())
    if found is None:
        raise QKDError(f"{said}; no intact checkpoint is left: start the run again (--overwrite)")
    name, snapshot = found
    meta = snapshot.get("qkd", {})
    again = name not in ("last.pt", PREVIOUS) and not meta.get("finished")
    lost = ": the epochs trained after that stage boundary are trained again" if again else ""
    rotated = [n for n in ("last.pt", PREVIOUS) if n in problems and (ckpts / n).is_file()]
    for n in rotated:
        os.replace(ckpts / n, ckpts / f"{n}{DAMAGED}")
    kept = f"; the damaged {' and '.join(rotated)} kept as {' and '.join(n + DAMAGED for n in rotated)}"
    where = meta.get("position")
    log.warning("%s; resuming from %s (%s) instead%s%s", said, name, where, lost, kept if rotated else "")


def clear_exports(run_dir: Path) -> None:
    """Remove exports made from an earlier state of a run that is training again: they no longer match it."""
    stale = sorted(p for p in (run_dir / "export").glob("*") if p.is_file())
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed %d export file(s) of %s made before this resume; export again when it ends",
                 len(stale), run_dir)  # fmt: skip


def check_room(run_dir: Path, models: list, stages: int = 1) -> None:
    """Refuse to start where the disk cannot hold the run's checkpoints (``last.pt`` and ``previous.pt`` hold
    both models with their optimizer state, about three times the weights each, plus one file per stage, which
    holds both models too: the run's snapshot at that boundary)."""
    weights = sum(t.numel() * t.element_size() for m in models if m is not None for t in m.state_dict().values())
    need = (6 + max(stages, 1)) * weights
    folder = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise QKDError(f"{folder} has {free / 2**20:.0f} MiB free; the run's checkpoints need about "
                       f"{need / 2**20:.0f} MiB: free some space or choose another --out")  # fmt: skip
