"""The CIFAR-10 study on the clean protocol: QKD against its baselines, with seeds and paired intervals.

Protocol. The pretrained CIFAR ResNets were trained on the whole original training set, so no training
image can validate them: validation is 5,000 class-balanced test images fixed once
(``data.val_from=test``, the same for every seed), the test figures come from the other 5,000, and all
50,000 training images train. Step 0 fine-tunes the pretrained float model(s) on this JPEG copy once
(seed 0, shared by every seed); then each (bit-width, method, seed) cell trains from those weights. Seeds
change the quantized training only (data order, augmentation, quantizer calibration batch), and the same
seed gives every method the same data subset and order: qkd minus another method, seed by seed, is a
paired difference.

Results live in one JSON per study under ``docs/study/`` (every run's settings, summary and per-epoch
history): a cell already there is never run again, on this machine or another, so seeds and bit-widths
can be added later. A cell is the same cell while it differs in no setting that it computes with (the rules of
``qkd.reuse``: settings that say where are no part of it, nor is a setting added to qkd after the cell was
stored while it holds its default); ``report`` redraws the tables and figures from the JSON alone.

    python benchmarks/study.py run --bits 2 --bits 3 --methods qat --methods kd --methods qkd --seeds 0 --seeds 1
    python benchmarks/study.py run --bits 2 --methods kd --methods qkd --epochs 12   # a point of the epochs curve
    python benchmarks/study.py run --bits 2 --bits 4 --methods ptq --methods adaround  # post-training baselines
    python benchmarks/study.py report                      # tables, intervals, figures -> docs/RESULTS.md
    python benchmarks/study.py run --device cuda --jobs 5 ...                       # on a GPU

Needs the CIFAR-10 arrays and pretrained checkpoints of ../shared/data (or ``--data-dir``), and scipy for
the report (``pip install -e .[bench]``).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path

import typer
from common import DATA_DIR, ROOT, command_line, machine, publish, run_parallel

from qkd import pipeline
from qkd.checkpoint import write_text
from qkd.config import RunConfig, list_presets, load_config
from qkd.report import figures as plot
from qkd.reuse import differences, identity, read_history, run_or_reuse, unused

TRAINED = ["qat", "kd", "ss+tu", "cs+tu", "qkd"]
PTQ = {"ptq": "calibrate", "adaround": "adaround"}  # cells of method=ptq, by quant.ptq: nothing trained, no epochs
METHODS = TRAINED + list(PTQ)
PRETRAINED = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
FLOAT_SEED = 0  # step 0 runs once, with this seed, for every seed of the study
app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.callback()
def _commands() -> None:
    """Run the study's cells, or report them (tables, intervals, figures) from its JSON."""


# ----- the store: one JSON per study, the only thing that must survive the machine ------------------------
def store_path(study: str) -> Path:
    return ROOT / "docs" / "study" / f"{study}.json"


def load_store(study: str) -> dict:
    path = store_path(study)
    return json.loads(path.read_text()) if path.is_file() else {"float": {}, "runs": {}}


def save_store(study: str, store: dict) -> None:
    path = store_path(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(store, indent=1, sort_keys=True) + "\n", path)  # atomic: a kill keeps the old file


# ----- configurations -----------------------------------------------------------------------------------
def train_file(data_dir: Path) -> Path:
    """The decoded arrays, or the same images as JPEG bytes (the form small enough to carry to a GPU machine)."""
    arrays = data_dir / "cifar10-jpeg-train.npz"
    return arrays if arrays.is_file() else data_dir / "cifar10-jpeg-bytes-train.npz"


def base_config(data_dir: Path, bits: int, teacher: str, device: str, seed: int, overrides: list[str]) -> RunConfig:
    """The preset of this bit-width on the clean protocol (a width without a preset, e.g. 8: the W4A4 preset with
    its bits set)."""
    preset = f"cifar10-resnet20-w{bits}a{bits}"
    widths = [] if preset in list_presets() else [f"quant.weight_bits={bits}", f"quant.act_bits={bits}"]
    return load_config(
        preset if not widths else "cifar10-resnet20-w4a4",
        [
            *widths,
            "data.name=npz",
            f"data.root={train_file(data_dir)}",
            "data.val_from=test",
            "data.val_size=5000",
            f"teacher.name={teacher}",
            f"device={device}",
            f"seed={seed}",
            *overrides,
        ],
    )


def float_config(data_dir: Path, role: str, model: str, epochs: int, device: str) -> RunConfig:
    cfg = base_config(data_dir, 4, model, device, FLOAT_SEED, [])
    cfg.name = f"fp-{role}-{model}-e{epochs}"
    mcfg = getattr(cfg, role)
    mcfg.name, mcfg.checkpoint = model, str(data_dir / "weights" / PRETRAINED[model])
    mcfg.train_epochs, mcfg.lr = epochs, 0.01
    return cfg


def cell_name(bits: int, method: str, epochs: int, limit: int | None, tag: str, seed: int,
              fresh: int | None = None) -> str:  # fmt: skip
    """``w2a2-qkd-e4-n2500-s0``: a fixed subset of 2,500 images per epoch; ``-d12500``: 12,500 drawn afresh from
    all each epoch. A post-training cell has no epochs (``w2a2-adaround-n2500-s0``: it calibrates on the same
    subset of training images)."""
    trained = f"-e{epochs}" if method not in PTQ else ""
    images = f"d{fresh}" if fresh else f"n{limit or 'all'}"
    return f"w{bits}a{bits}-{method}{trained}-{images}{'-' + tag if tag else ''}-s{seed}"


def _grid(specs: list[str]) -> list[tuple[int, str, int, int | None]]:
    """``BITS:METHODS:SEEDS[:EPOCHS]`` specs -> (bits, method, seed, epochs) cells, in order."""
    cells = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise typer.BadParameter(f"--grid {spec!r}: expected BITS:METHODS:SEEDS[:EPOCHS], e.g. 2,3:qat,qkd:0,1")
        bits, methods, seeds = ([x for x in part.split(",") if x] for part in parts[:3])
        if bad := set(methods) - set(METHODS):
            raise typer.BadParameter(f"--grid {spec!r}: unknown methods {sorted(bad)}; valid: {', '.join(METHODS)}")
        e = int(parts[3]) if len(parts) == 4 else None
        cells += [(int(b), m, int(s), e) for s in seeds for b in bits for m in methods]
    return cells


# ----- running --------------------------------------------------------------------------------------------
def record(cfg: RunConfig, out: Path, stages=None) -> dict:
    """A run's record for the store (what it computes, its summary and history); the run itself is read where it
    finished, resumed where it was interrupted, trained where there is none (``qkd.reuse``'s rules)."""
    summary = run_or_reuse(cfg, out, stages)
    return {"config": identity(cfg), "summary": summary, "history": read_history(out / cfg.name)}


@app.command()
def run(
    study: str = typer.Option("cifar10-clean", help="the study's name: docs/study/<name>.json"),
    bits: list[int] = typer.Option([2, 3], help="bit-widths (W = A)"),
    methods: list[str] = typer.Option(
        TRAINED,
        help=f"methods: {', '.join(METHODS)} (ptq: calibrated only, adaround: ptq with AdaRound; neither trains)",
    ),
    seeds: list[int] = typer.Option([0], help="seeds"),
    epochs: int = typer.Option(4, min=1, help="quantized epochs per method"),
    train_limit: int | None = typer.Option(2_500, help="training images per epoch (a stratified subset, per seed)"),
    epoch_images: int | None = typer.Option(
        None,
        min=1,
        help="training images per epoch drawn afresh from all 50,000 each epoch (replaces --train-limit): "
        "a budget in images seen, e.g. --epochs 4 --epoch-images 50000 for 200,000",
    ),
    fp_epochs: int = typer.Option(1, min=1, help="step 0: float fine-tuning epochs on all 50,000 images"),
    teacher: str = typer.Option("resnet20", help="teacher: resnet20 (the float student teaches) or resnet56"),
    set_: list[str] = typer.Option([], "--set", help="config override for every cell, e.g. runtime.amp=false"),
    tag: str = typer.Option("", help="names the variant --set and --teacher make"),
    device: str = "auto",
    grid: list[str] = typer.Option(
        [],
        help="BITS:METHODS:SEEDS[:EPOCHS], e.g. 2,3:qat,kd,qkd:0,1,2 (repeatable; "
        "replaces --bits/--methods/--seeds, cells in the order given)",
    ),
    jobs: int = typer.Option(
        2,
        min=1,
        help="runs at once, each in its own process (on 2 cores, 2 x 1 thread "
        "trains ~17 % more images per second than 1 x 2 threads)",
    ),
    data_dir: Path = DATA_DIR,
    out: Path = ROOT / "runs" / "study",
) -> None:
    """Run the cells that the study's JSON does not hold yet (in order: seed, then bits, then method)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not train_file(data_dir).is_file():
        raise typer.BadParameter(f"no cifar10-jpeg-train.npz or cifar10-jpeg-bytes-train.npz in {data_dir}; "
                                 "pass --data-dir")  # fmt: skip
    if bad := set(methods) - set(METHODS):
        raise typer.BadParameter(f"unknown methods {sorted(bad)}; valid: {', '.join(METHODS)}")
    if (bool(set_) or teacher != "resnet20") and not tag:
        raise typer.BadParameter("--set and --teacher change the cells: name the variant with --tag")
    if epoch_images is not None:
        train_limit = None
    store = load_store(study)
    store.setdefault("machines", {})[machine()] = True

    def keep(kind: str, name: str, record: dict) -> None:
        # read again first: another study run (or a report) may have stored cells since this one started
        fresh = load_store(study)
        fresh.setdefault("machines", {})[machine()] = True
        for part in (store, fresh):
            part[kind][name] = record | {"machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M")}
        save_store(study, fresh)
        logging.info("stored %s in %s", name, store_path(study))

    # step 0: the float student (and a teacher of another architecture), once per study
    ckpts, start = {}, {}
    for role, model in (("student", "resnet20"), ("teacher", teacher)):
        if role == "teacher" and model == "resnet20":
            ckpts["teacher"], start["teacher"] = ckpts["student"], start["student"]
            continue
        cfg = float_config(data_dir, role, model, fp_epochs, device)
        ckpts[role], start[role] = out / cfg.name / "checkpoints" / f"fp_{role}.pt", cfg.name
        made = record(cfg, out, [pipeline.model_float_stage(cfg, role)])
        stored = store["float"].get(cfg.name)
        if stored is None:
            keep("float", cfg.name, made)
        elif stored["summary"]["stages"] != made["summary"]["stages"]:
            logging.warning("step 0 here (%s) differs from the stored one (another machine?): cells run now start "
                            "from other float weights than the stored cells", cfg.name)  # fmt: skip

    cells, about = [], {}
    plan = _grid(grid) if grid else [(b, m, s, None) for s in seeds for b in bits for m in methods]
    for b, m, seed, e in plan:
        e = 0 if m in PTQ else e or epochs
        method = ["method=ptq", f"quant.ptq={PTQ[m]}"] if m in PTQ else [f"method={m}", f"epochs={e}"]
        cfg = base_config(data_dir, b, teacher, device, seed, ["runtime.eval=lean", *set_, *method])
        cfg.name = cell_name(b, m, e, train_limit, tag, seed, epoch_images)
        cfg.data.train_limit, cfg.data.epoch_images = train_limit, epoch_images
        for role in ("student", "teacher"):
            mcfg = getattr(cfg, role)
            mcfg.checkpoint, mcfg.train_epochs = str(ckpts[role].resolve()), 0
        stored = store["runs"].get(cfg.name)
        if stored is not None:
            if differences(stored["config"], cfg, unused(pipeline.run_plan(cfg))) or stored["start"] != start:
                raise typer.BadParameter(f"{cfg.name} is stored with other settings; use another --tag")
            continue
        cells.append((cfg, None))
        about[cfg.name] = {"bits": b, "method": m, "seed": seed, "epochs": e, "train_limit": train_limit,
                           "epoch_images": epoch_images,
                           "tag": tag, "teacher": teacher}  # fmt: skip
    logging.info("%d cells to run (%d already stored)", len(cells), len(store["runs"]))
    done = lambda job, rec: keep("runs", job[0].name, rec | {"start": start, "cell": about[job[0].name]})  # noqa: E731
    run_parallel(record, [(cfg, out, stages) for cfg, stages in cells], jobs, done)


@app.command()
def merge(
    source: Path = typer.Argument(..., help="another study JSON, e.g. the GPU slice's cifar10-clean-gpu.json"),
    study: str = typer.Option("cifar10-clean", help="the study to merge into: docs/study/<name>.json"),
) -> None:
    """Add the runs of ``source`` that the study does not hold (a cell of the same name is never replaced; a name
    held with other results is named, and the merge refused)."""
    other, store = json.loads(source.read_text()), load_store(study)
    for kind in ("float", "runs"):
        clash = [n for n, r in other.get(kind, {}).items() if n in store[kind] and store[kind][n] != r]
        if clash:
            raise typer.BadParameter(f"{source}: {kind} {clash[0]} is in {store_path(study)} with other results; "
                                     "run that slice with --tag")  # fmt: skip
    added = [n for n in other.get("runs", {}) if n not in store["runs"]]
    for kind in ("float", "runs"):
        store[kind] = {**other.get(kind, {}), **store[kind]}
    store.setdefault("machines", {}).update(other.get("machines", {}))
    save_store(study, store)
    typer.echo(f"merged {len(added)} runs into {store_path(study)}: {', '.join(added) or 'none new'}")


# ----- reporting: from the JSON alone ---------------------------------------------------------------------
def final(record: dict, split: str = "test") -> float:
    """The run's final model on a split, in %."""
    return 100 * list(record["summary"]["stages"].values())[-1][split]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the two ends of its 95 % Student-t interval (nan ends for fewer than 2 values)."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def cells_of(store: dict, epochs: int, train_limit: int | None, tag: str = "",
             epoch_images: int | None = None) -> dict[tuple[int, str], dict]:  # fmt: skip
    """(bits, method) -> {seed: record} for one budget and variant; post-training cells (0 epochs) beside every
    budget of their training images."""
    out: dict[tuple[int, str], dict] = {}
    for rec in store["runs"].values():
        c = rec["cell"]
        if c["epochs"] in (epochs, 0) and (c["train_limit"], c["tag"], c.get("epoch_images")) == (
            train_limit, tag, epoch_images):  # fmt: skip
            out.setdefault((c["bits"], c["method"]), {})[c["seed"]] = rec
    return out


def paired(cells: dict, bits: int, other: str, split: str = "test", method: str = "qkd") -> dict | None:
    """``method`` (qkd) minus ``other`` seed by seed (same seed: same data subset and order), with its 95 % interval.
    Two runs pair only under one seeding scheme: runs before 2026-12-02 seeded stages by index, later ones by name."""
    a, b = cells.get((bits, method), {}), cells.get((bits, other), {})
    seeds = sorted(s for s in a.keys() & b.keys() if seeding(a[s]) == seeding(b[s]))
    if not seeds:
        return None
    diffs = [final(a[s], split) - final(b[s], split) for s in seeds]
    mean, lo, hi = t_interval(diffs)
    return {"other": other, "bits": bits, "seeds": seeds, "diffs": diffs, "mean": mean, "ci95": [lo, hi]}


def cpu(record: dict) -> str:
    """The machine a run trained on, as far as it decides the numbers (the CPU and its bf16; not threads): runs of two
    CPUs start from two step 0s and never pair."""
    return record["machine"].split(",")[0].replace("(R)", "").replace(" Processor", "")


def seeding(record: dict) -> str:
    """How a stored run seeded its stages (runs stored before the scheme was recorded: by index)."""
    return record["summary"].get("seeding", "stage-index")


def float_reference(store: dict) -> dict[str, float]:
    rec = next(r for name, r in store["float"].items() if name.startswith("fp-student-"))
    stage = list(rec["summary"]["stages"].values())[-1]
    return {"test": 100 * stage["test"], "val": 100 * stage["val"]}


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def accuracy_table(cells: dict, split: str = "test") -> str:
    bits = sorted({b for b, _ in cells}, reverse=True)
    lines = ["| method | " + " | ".join(f"W{b}A{b}" for b in bits) + " |", "|---|" + "---:|" * len(bits)]
    for m in METHODS:
        row = [_fmt([final(r, split) for r in cells[b, m].values()]) if (b, m) in cells else "" for b in bits]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(diffs: list[dict]) -> str:
    lines = ["| bits | qkd minus | seeds | mean | 95 % interval | above zero? |", "|---|---|---:|---:|---|---|"]
    for d in diffs:
        lo, hi = d["ci95"]
        verdict = "yes" if lo > 0 else "below zero" if hi < 0 else "no (spans 0)"
        verdict = "n/a (1 seed)" if math.isnan(lo) else verdict
        lines.append(f"| W{d['bits']}A{d['bits']} | {d['other']} | {len(d['seeds'])} | {d['mean']:+.2f} | "
                     f"[{lo:+.2f}, {hi:+.2f}] | {verdict} |")  # fmt: skip
    return "\n".join(lines)


def mechanism_table(cells: dict) -> str:
    """Teacher accuracy and KL(teacher || student) on the validation half, before and after co-study (qkd, cs+tu),
    beside kd's fixed teacher at the start and end of its tutoring."""
    lines = ["| bits | method | teacher val % before -> after | KL(teacher‖student) before -> after | "
             "KL from the teacher before co-study to the same student | KL at the end of the run |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (b, m), runs in sorted(cells.items(), key=lambda kv: (-kv[0][0], METHODS.index(kv[0][1]))):
        ts = [r["summary"].get("teacher_student", {}) for r in runs.values()]
        if not ts or not ts[0]:
            continue
        mean = lambda xs: statistics.mean(xs)  # noqa: E731
        first = [next(iter(t.values())) for t in ts]  # the first distillation stage
        last = [list(t.values())[-1] for t in ts]
        if m in ("qkd", "cs+tu"):
            co = [t[k] for t in ts for k in t if k.endswith("co_study")]
            lines.append(
                f"| W{b}A{b} | {m} | {100 * mean([c['start']['teacher_acc'] for c in co]):.2f} -> "
                f"{100 * mean([c['end']['teacher_acc'] for c in co]):.2f} | "
                f"{mean([c['start']['kl'] for c in co]):.3f} -> {mean([c['end']['kl'] for c in co]):.3f} | "
                f"{mean([c['end']['kl_reference'] for c in co]):.3f} | {mean([x['end']['kl'] for x in last]):.3f} |"
            )
        else:
            lines.append(
                f"| W{b}A{b} | {m} (fixed teacher) | {100 * mean([x['start']['teacher_acc'] for x in first]):.2f} | "
                f"{mean([x['start']['kl'] for x in first]):.3f} -> {mean([x['end']['kl'] for x in last]):.3f} | | "
                f"{mean([x['end']['kl'] for x in last]):.3f} |"
            )
    return "\n".join(lines)


def timing_table(cells: dict) -> str:
    """Mean wall seconds per phase (training and evaluation) for each method."""
    lines = ["| method | phases: train s + eval s (mean over cells) | run s |", "|---|---|---:|"]
    for m in METHODS:
        runs = [r for (b, mm), rs in cells.items() if mm == m for r in rs.values()]
        if not runs:
            continue
        parts = []
        for key in runs[0]["summary"]["stages"]:
            train = statistics.mean(sum(h["time_s"] - h.get("eval_s", 0) for h in r["history"] if h["stage"] == key)
                                    or r["summary"]["stages"][key]["wall_s"] for r in runs)  # fmt: skip
            ev = statistics.mean(sum(h.get("eval_s", 0) for h in r["history"] if h["stage"] == key) for r in runs)
            parts.append(f"{key.split('_', 1)[1]} {train:.0f} + {ev:.0f}")
        lines.append(f"| {m} | {', '.join(parts)} | {statistics.mean(r['summary']['wall_s'] for r in runs):.0f} |")
    return "\n".join(lines)


def _changed(rec: dict, ref: dict) -> str:
    """The settings in which a variant's run differs from the base run of the same seed."""
    return ", ".join(f"{k}={rec['config'].get(k)}" for k in differences(rec["config"], ref["config"])) or "nothing"


def _interval(diffs: list[float]) -> str:
    mean, lo, hi = t_interval(diffs)
    return f"{mean:+.2f}" + ("" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]")


def variants_table(store: dict, epochs: int, train_limit: int | None, against: dict[str, str] | None = None,
                   epoch_images: int | None = None) -> str:  # fmt: skip
    """Each variant (a ``--tag``) against the base cells of the same seeds (or the cells of the tag ``against``
    names for it) run on the same machine (the same step 0): validation, where choices are made, and test beside
    it; for co-studying methods, where co-study left the teacher (validation half)."""
    against = against or {}
    tags = sorted({r["cell"]["tag"] for r in store["runs"].values()} - {""} - set(against.values()))
    lines = ["| variant | against | what it changes | bits | method | seeds | val % variant / base | variant − base, "
             "val [95 %] | variant − base, test [95 %] | teacher val % after co-study, KL to student (ref), variant / "
             "base |",
             "|---|---|---|---|---|---:|---|---|---|---|"]  # fmt: skip
    for tag in tags:
        base = cells_of(store, epochs, train_limit, against.get(tag, ""), epoch_images)
        variant = cells_of(store, epochs, train_limit, tag, epoch_images)
        for (b, m), runs in sorted(variant.items(), key=lambda kv: (-kv[0][0], METHODS.index(kv[0][1]))):
            ref = base.get((b, m), {})
            seeds = sorted(s for s in runs.keys() & ref.keys() if cpu(runs[s]) == cpu(ref[s]))
            if not seeds:
                continue
            var, old = [runs[s] for s in seeds], [ref[s] for s in seeds]
            diff = {split: [final(v, split) - final(o, split) for v, o in zip(var, old)] for split in ("val", "test")}
            co = {name: [c for r in rs for k, c in r["summary"].get("teacher_student", {}).items()
                         if k.endswith("co_study")] for name, rs in (("var", var), ("old", old))}  # fmt: skip
            teacher = " / ".join(f"{100 * statistics.mean(c['end']['teacher_acc'] for c in cs):.2f}, "
                                 f"{statistics.mean(c['end']['kl'] for c in cs):.3f} "
                                 f"({statistics.mean(c['end']['kl_reference'] for c in cs):.3f})"
                                 for cs in co.values() if cs)  # fmt: skip
            lines.append(
                f"| {tag} | {against.get(tag) or 'base'} | {_changed(var[0], old[0])} | W{b}A{b} | {m} | "
                f"{len(seeds)} | "
                f"{statistics.mean(final(v, 'val') for v in var):.2f} / "
                f"{statistics.mean(final(o, 'val') for o in old):.2f} | {_interval(diff['val'])} | "
                f"{_interval(diff['test'])} | {teacher} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


@app.command()
def variants(
    study: str = typer.Option("cifar10-clean", help="the study's name: docs/study/<name>.json"),
    epochs: int = typer.Option(4, help="the budget's epochs"),
    train_limit: int | None = typer.Option(2_500, help="the budget's training images per epoch (a fixed subset)"),
    epoch_images: int | None = typer.Option(None, help="or: its images per epoch drawn afresh (e.g. 50000)"),
    against: list[str] = typer.Option([], help="VARIANT=TAG: compare that variant with the cells of TAG"),
) -> None:
    """The variants table alone, at any budget (``report`` draws it at its main budget with everything else), e.g.
    the co-study teacher's rate at 200,000 images: ``variants --epoch-images 50000 --against tlr1e-3=TAG``."""
    if bad := [a for a in against if a.count("=") != 1]:
        raise typer.BadParameter(f"--against {bad[0]!r}: expected VARIANT=TAG, e.g. tlr1e-3=zen4")
    store = load_store(study)
    table = variants_table(store, epochs, None if epoch_images else train_limit, dict(a.split("=") for a in against),
                           epoch_images)  # fmt: skip
    if not table:
        raise typer.BadParameter(f"{store_path(study)} holds no variant with base cells of the same seeds and "
                                 "machine at this budget")  # fmt: skip
    typer.echo(table)


def training_table(store: dict, epochs: int, train_limit: int | None, tag: str = "") -> str:
    """What training buys: each trained method (cells of ``tag``) minus each post-training one, seed by seed, where
    both ran on the same machine (the same step 0; a post-training cell has no tag)."""
    trained, post = cells_of(store, epochs, train_limit, tag), cells_of(store, epochs, train_limit)
    lines = ["| bits | trained | post-training | seeds | val % trained / post | trained − post, val [95 %] | "
             "trained − post, test [95 %] |", "|---|---|---|---:|---|---|---|"]  # fmt: skip
    for b in sorted({b for b, m in post if m in PTQ}, reverse=True):
        for m in TRAINED:
            for p in PTQ:
                a, z = trained.get((b, m), {}), post.get((b, p), {})
                seeds = sorted(s for s in a.keys() & z.keys() if cpu(a[s]) == cpu(z[s]))
                if not seeds:
                    continue
                diff = {k: [final(a[s], k) - final(z[s], k) for s in seeds] for k in ("val", "test")}
                lines.append(f"| W{b}A{b} | {m} | {p} | {len(seeds)} | "
                             f"{statistics.mean(final(a[s], 'val') for s in seeds):.2f} / "
                             f"{statistics.mean(final(z[s], 'val') for s in seeds):.2f} | "
                             f"{_interval(diff['val'])} | {_interval(diff['test'])} |")  # fmt: skip
    return "\n".join(lines) if len(lines) > 2 else ""


def bits_figure(store: dict, epochs: int, train_limit: int | None, prefix: Path) -> Path | None:
    """The bits each layer got within ``quant.budget``, per budgeted variant (a line per seed)."""
    chosen: dict[str, list[dict]] = {}
    for rec in store["runs"].values():
        c, budget = rec["cell"], rec["summary"].get("budget")
        if budget and (c["epochs"], c["train_limit"]) == (epochs, train_limit):
            bits = {**{n: wa[0] for n, wa in budget["fixed"].items()}, **budget["bits"]}
            chosen.setdefault(f"{c['tag']} {c['method']}", []).append(bits)
    if not chosen:
        return None
    fig, (ax,) = plot.figure(size=(8.0, 3.4))
    names = sorted({n for runs in chosen.values() for bits in runs for n in bits}, key=_layer_order)
    for i, (label, runs) in enumerate(sorted(chosen.items())):
        for j, bits in enumerate(runs):
            ax.plot(range(len(names)), [bits.get(n) for n in names], marker="o", color=f"C{i}", alpha=0.6,
                    label=label if j == 0 else None, drawstyle="steps-mid")  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax.set_ylabel("bits (weights and input)")
    ax.set_title("Bits per layer chosen within the budget (a line per seed)")
    ax.legend(fontsize=7)
    return plot.save(fig, prefix.with_name(prefix.name + "-budget-bits.png"))


def _layer_order(name: str) -> tuple:
    """Module names sorted with their numbers as numbers (``layer1.2`` before ``layer1.10``): a ResNet's order."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def figures(store: dict, cells: dict, diffs: list[dict], budget: tuple, prefix: Path) -> list[Path]:
    """The paired differences with their intervals, and the W2A2 curve against training length (drawn by
    qkd.report.figures, as qkd report draws)."""
    made = []
    fig, (ax,) = plot.figure(size=(6.5, 3.2))
    rows = [plot.Interval(f"W{d['bits']}A{d['bits']}: qkd − {d['other']} ({len(d['seeds'])} seeds)", d["mean"],
                          *d["ci95"], d["diffs"], f"C{d['bits']}") for d in diffs]  # fmt: skip
    plot.intervals_plot(ax, rows, xlabel="test top-1 points (qkd minus the other method, same seed)")
    ax.set_title("Paired differences: mean and 95 % interval (grey: each seed)")
    made.append(plot.save(fig, prefix.with_name(prefix.name + "-paired.png")))

    curve = {}  # W2A2 kd and qkd: test % against epochs, at the main budget's images per epoch
    for rec in store["runs"].values():
        c = rec["cell"]
        if c["bits"] == 2 and c["method"] in ("kd", "qkd") and not c["tag"] and c["train_limit"] == budget[1]:
            curve.setdefault(c["method"], {}).setdefault(c["epochs"], []).append(final(rec))
    if any(len(v) > 1 for v in curve.values()):
        fig, (ax,) = plot.figure(size=(5.5, 3.5))
        plot.series_plot(ax, dict(sorted(curve.items())), plot.METHOD_COLOURS, log_x=True)
        ax.axhline(float_reference(store)["test"], color="gray", linestyle="--", label="float ResNet-20")
        title = "W2A2: accuracy against training length\n(mean; bars: sd where there are several seeds)"
        ax.set(xlabel=f"epochs of {budget[1] or 50_000} images", ylabel="test top-1 %", title=title)
        ax.legend()
        made.append(plot.save(fig, prefix.with_name(prefix.name + "-epochs-w2a2.png")))
    return made


@app.command()
def report(
    study: str = typer.Option("cifar10-clean", help="the study's name: docs/study/<name>.json"),
    epochs: int = typer.Option(4, help="the budget reported in the main tables"),
    train_limit: int | None = typer.Option(2_500, help="the budget's training images per epoch"),
    append: bool = typer.Option(True, help="append the section to docs/RESULTS.md"),
    against: list[str] = typer.Option(
        [],
        help="VARIANT=TAG: compare that variant with the cells of TAG, not the "
        "base (e.g. mp-w3size=xeon: the uniform cells run from the same step 0)",
    ),
    trained: str = typer.Option(
        "", help="the tag of the trained cells the post-training ones are paired with (same machine, same step 0)"
    ),
) -> None:
    """Tables (means, standard deviations, paired 95 % intervals, mechanism, time per phase) and figures,
    from the study's JSON alone; the paired differences are written back into it."""
    store = load_store(study)
    cells = cells_of(store, epochs, train_limit)
    if not cells:
        raise typer.BadParameter(f"{store_path(study)} holds no cells of {epochs} epochs x {train_limit} images")
    bits = sorted({b for b, _ in cells}, reverse=True)
    diffs = [d for b in bits for m in METHODS if m != "qkd" and (d := paired(cells, b, m))]
    store["paired"] = {f"w{d['bits']}a{d['bits']}-qkd-minus-{d['other']}-e{epochs}-n{train_limit}": d for d in diffs}
    save_store(study, store)
    ref = float_reference(store)
    made = figures(store, cells, diffs, (epochs, train_limit), store_path(study).with_suffix(""))
    rel = [f.relative_to(ROOT / "docs") for f in made]
    if bad := [a for a in against if a.count("=") != 1]:
        raise typer.BadParameter(f"--against {bad[0]!r}: expected VARIANT=TAG, e.g. mp-w3size=xeon")
    variants = variants_table(store, epochs, train_limit, dict(a.split("=") for a in against))
    if (bits_png := bits_figure(store, epochs, train_limit, store_path(study).with_suffix(""))) is not None:
        rel.append(bits_png.relative_to(ROOT / "docs"))
    if variants:
        variants = f"Variants, seed by seed against the cells above (the presets re-checked):\n\n{variants}\n\n"
    if buys := training_table(store, epochs, train_limit, trained):
        variants += f"What training buys over post-training quantization (cells of tag '{trained}'):\n\n{buys}\n\n"
    text = (
        f"\n### CIFAR-10 study, clean protocol: {epochs} epochs x {train_limit or 50_000} images, "
        f"{time.strftime('%Y-%m-%d')}\n\n"
        f"Machines: {'; '.join(store['machines'])}.\n"
        f"Validation = 5,000 class-balanced test images fixed once, test = the other 5,000; every training image "
        f"trains. Float ResNet-20 after step 0: test {ref['test']:.2f} %, validation {ref['val']:.2f} %. "
        f"Data and every run's settings, summary and history: `{store_path(study).relative_to(ROOT)}`.\n"
        f"Command: `{command_line().strip()}` (the runs: `python benchmarks/study.py run ...`, see the JSON).\n\n"
        f"Test top-1 %, mean ± standard deviation (seeds):\n\n{accuracy_table(cells)}\n\n"
        f"Validation top-1 % (what choices are made on):\n\n{accuracy_table(cells, 'val')}\n\n"
        f"qkd minus each method, seed by seed, on test:\n\n{paired_table(diffs)}\n\n"
        f"The mechanism, on the validation half (means over seeds; KL in nats, temperature 1):\n\n"
        f"{mechanism_table(cells)}\n\nWhere the time goes (seconds per run, this budget):\n\n{timing_table(cells)}\n\n"
        + variants
        + "".join(f"![{f.stem}]({f})\n" for f in rel)
    )
    publish(text, append)


def budget_points(store: dict, bits: int, tags: tuple[str, ...] = ("",)) -> list[dict]:
    """qkd minus kd at W``bits``, per training budget in images seen, paired seed by seed on test and validation: the
    fixed-subset budgets (epochs x --train-limit, the same images each epoch) and the drawn-afresh ones (epochs x
    --epoch-images), of the cells of ``tags``, apart by machine (each machine has its own step 0); with where
    co-study left the teacher, the wall time of a cell, and kd and qkd minus any other method stored there."""
    groups: dict[tuple[str, int], dict[str, dict[int, dict]]] = {}
    for rec in store["runs"].values():
        c = rec["cell"]
        if c["bits"] != bits or c["tag"] not in tags or not c["epochs"]:
            continue
        fresh = c.get("epoch_images")
        kind = "drawn afresh from all 50,000" if fresh else f"a fixed subset of {c['train_limit'] or 50_000}"
        kind += f", {cpu(rec)}"
        seen = c["epochs"] * (fresh or c["train_limit"] or 50_000)
        groups.setdefault((kind, seen), {}).setdefault(c["method"], {})[c["seed"]] = rec
    points = []
    for (kind, seen), by_method in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = {(bits, m): runs for m, runs in by_method.items()}
        d = paired(cells, bits, "kd")
        if d is None:
            continue
        val = paired(cells, bits, "kd", "val")
        floors = {  # (kd or qkd, another method) -> their paired difference on each split
            (m, o): {split: paired(cells, bits, o, split, m) for split in ("test", "val")}
            for o in sorted(by_method.keys() - {"kd", "qkd"}) for m in ("kd", "qkd")
        }  # fmt: skip
        runs = {m: [by_method[m][s] for s in d["seeds"]] for m in ("kd", "qkd")}
        co = [t[k] for r in runs["qkd"] for t in [r["summary"].get("teacher_student", {})] for k in t
              if k.endswith("co_study")]  # fmt: skip
        points.append({
            "kind": kind, "images": seen, **d, "val_diffs": val["diffs"], "floors": floors,
            "others": {m: _fmt([final(r) for r in by_method[m].values()]) for m in by_method.keys() - {"kd", "qkd"}},
            **{m: _fmt([final(r) for r in runs[m]]) for m in ("kd", "qkd")},
            "wall_s": {m: statistics.mean(r["summary"]["wall_s"] for r in runs[m]) for m in ("kd", "qkd")},
            "teacher": co and [statistics.mean(100 * c[at]["teacher_acc"] for c in co) for at in ("start", "end")],
            "kl": co and [statistics.mean(c["end"][k] for c in co) for k in ("kl", "kl_reference")],
            "kl_end": {m: statistics.mean(list(r["summary"]["teacher_student"].values())[-1]["end"]["kl"]
                                          for r in runs[m]) for m in ("kd", "qkd")},  # fmt: skip
        })  # fmt: skip
    return points


@app.command()
def curve(
    study: str = typer.Option("cifar10-clean", help="the study's name: docs/study/<name>.json"),
    bits: int = typer.Option(2, help="bit-width (W = A)"),
    tag: list[str] = typer.Option([""], help="the cells' tags to draw (\"\" = untagged; e.g. --tag '' --tag xeon)"),
    append: bool = typer.Option(False, help="append the section to docs/RESULTS.md"),
) -> None:
    """Does qkd pay off with training? qkd minus kd against the budget in images seen, paired, on test and validation,
    with where co-study left the teacher and the time a cell took."""
    store = load_store(study)
    points = budget_points(store, bits, tuple(tag))
    if not points:
        raise typer.BadParameter(f"{store_path(study)} holds no paired kd/qkd cells at W{bits}A{bits}")
    lines = [
        "| images seen | how drawn, machine | seeds | kd test % | qkd test % | qkd − kd, test [95 %] | "
        "qkd − kd, val [95 %] | co-study: teacher val % before -> after | KL(teacher‖student) after co-study "
        "(fixed teacher, same student) | KL(teacher‖student) at the end, kd / qkd | minutes per cell kd / qkd |",
        "|---:|---|---:|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        teacher = f"{p['teacher'][0]:.2f} -> {p['teacher'][1]:.2f}" if p["teacher"] else ""
        kl = f"{p['kl'][0]:.3f} ({p['kl'][1]:.3f})" if p["kl"] else ""
        lines.append(f"| {p['images']:,} | {p['kind']} | {len(p['seeds'])} | {p['kd']} | {p['qkd']} | "
                     f"{_interval(p['diffs'])} | {_interval(p['val_diffs'])} | {teacher} | {kl} | "
                     f"{p['kl_end']['kd']:.3f} / {p['kl_end']['qkd']:.3f} | "
                     f"{p['wall_s']['kd'] / 60:.1f} / {p['wall_s']['qkd'] / 60:.1f} |")  # fmt: skip
    others = [
        f"| {p['images']:,} | {p['kind']} | {o} | {p['others'][o]} | {m} − {o} | {len(f['test']['seeds'])} | "
        f"{_interval(f['test']['diffs'])} | {_interval(f['val']['diffs'])} |"
        for p in points for (m, o), f in p["floors"].items() if f["test"]
    ]  # fmt: skip
    if others:
        lines += ["", "Other methods at these budgets, paired seed by seed on the same machine:", "",
                  "| images seen | how drawn, machine | method | its test % | difference | seeds | test [95 %] | "
                  "val [95 %] |", "|---:|---|---|---|---|---:|---|---|", *others]  # fmt: skip
    fig, (ax,) = plot.figure(size=(6.4, 3.8))
    for i, kind in enumerate(sorted({p["kind"] for p in points})):
        ps = [p for p in points if p["kind"] == kind]
        lo = [p["mean"] - p["ci95"][0] if not math.isnan(p["ci95"][0]) else 0 for p in ps]
        hi = [p["ci95"][1] - p["mean"] if not math.isnan(p["ci95"][1]) else 0 for p in ps]
        ax.errorbar([p["images"] for p in ps], [p["mean"] for p in ps], yerr=[lo, hi], marker="o", capsize=3,
                    color=f"C{i}", label=kind)  # fmt: skip
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="training images seen (log)", ylabel="qkd − kd, test top-1 points",
           title=f"W{bits}A{bits}: qkd minus kd against budget (mean, paired 95 % interval)")  # fmt: skip
    ax.legend(fontsize=7)
    png = plot.save(fig, store_path(study).with_name(f"{study}-budget-w{bits}a{bits}.png"))
    text = (f"\n### W{bits}A{bits}: qkd minus kd against the training budget, {time.strftime('%Y-%m-%d')}\n\n"
            f"Command: `{command_line().strip()}`; machines: {'; '.join(store['machines'])}.\n\n"
            + "\n".join(lines) + f"\n\n![{png.stem}]({png.relative_to(ROOT / 'docs')})\n")  # fmt: skip
    publish(text, append)


if __name__ == "__main__":
    app()
