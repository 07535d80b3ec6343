"""The first CIFAR-10 study (old protocol): QKD against QAT-only, fixed-teacher KD and the ablations.

Superseded by ``benchmarks/study.py``: this one validates on 5,000 training images, which the pretrained
checkpoints were trained on. Kept for its recorded results and for ``benchmarks/tuning.py``.

Step 0 fine-tunes the pretrained float teacher and student on this data (the float student is the
reference and every method's starting point); then every method runs at the same epoch budget from
those float weights. Choices are made on the validation split (5,000 training images held out);
the test split gives only the final numbers. Each run is a normal ``qkd`` run folder under
``runs/accuracy-<budget>/``: a finished one is reused, an interrupted one resumed (``qkd.reuse``).

    python benchmarks/accuracy.py --budget cpu-short --bits 2 --bits 4
    python benchmarks/accuracy.py --budget paper --device cuda        # the paper's 30/100/70 epochs
    python benchmarks/accuracy.py --budget gpu-short --bits 2 --bits 3 --bits 4 --device cuda --jobs 5
    python benchmarks/accuracy.py --bits 2 --set quant.method=interval --tag interval   # a variant, beside
    python benchmarks/accuracy.py --bits 3 --epochs 30                 # the budget's data, 3x the epochs

A variant (``--set`` overrides for every method, named by ``--tag``) keeps its runs in
``runs/accuracy-<budget>-<tag>/`` and its JSON and plots in ``docs/accuracy-<budget>-<tag>*``; it
shares the float step (step 0) with the plain study. ``--epochs N`` likewise adds ``-eN`` to those names, and
``--teacher resnet20`` (self-distillation: the float student is its own teacher) ``-resnet20-teacher``.

``--jobs N`` runs N runs at once, each in its own process: one small CIFAR network leaves most of a GPU
idle (its time goes in kernel launches). Measured on an H200 (2026-11-27; the compiled kernels fell back
to eager there, a bug fixed since): 15 ResNet-20 runs side by side trained about 5,500 images/s in all,
5 (beside a MobileNetV2 run) about 4,800; the GPU time-slices between processes, so beyond a few jobs
the total barely grows.

Needs the CIFAR-10 arrays and pretrained checkpoints of ../shared/data (or ``--data-dir``).
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
from pathlib import Path

import typer
from common import DATA_DIR, ROOT, command_line, machine, publish, run_parallel

from qkd import pipeline
from qkd.config import RunConfig, load_config, with_overrides
from qkd.report import figures as plot
from qkd.reuse import read_history, run_or_reuse

METHODS = ["qat", "kd", "ss+tu", "cs+tu", "qkd"]
BUDGETS = {
    # epochs: the quantized budget shared by every method; fp_epochs: step-0 float fine-tuning;
    # train_limit: training images per quantized epoch (None = all 45,000).
    "paper": {"epochs": 200, "fp_epochs": 15, "train_limit": None, "fp_train_limit": None},
    "gpu-short": {"epochs": 30, "fp_epochs": 10, "train_limit": None, "fp_train_limit": None},
    "gpu-probe": {"epochs": 6, "fp_epochs": 1, "train_limit": 6000, "fp_train_limit": 6000},  # times each phase
    "cpu-short": {"epochs": 10, "fp_epochs": 1, "train_limit": 10_000, "fp_train_limit": None},
    "smoke": {"epochs": 7, "fp_epochs": 1, "train_limit": 500, "fp_train_limit": 500},  # checks the mechanics only
}
PRETRAINED = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
TEACHER = "resnet56"  # the study's teacher; another one (--teacher) gets its own folders


def base_config(data_dir: Path, teacher: str, device: str, seed: int) -> RunConfig:
    return load_config(
        "cifar10-resnet20-w4a4",
        [
            "data.name=npz",
            f"data.root={data_dir / 'cifar10-jpeg-train.npz'}",
            "data.val_size=5000",
            f"teacher.name={teacher}",
            f"device={device}",
            f"seed={seed}",
        ],
    )


def float_step(base: RunConfig, data_dir: Path, budget: dict, out: Path, parallel: int = 1) -> dict[str, Path]:
    """Fine-tune the pretrained teacher and student on this data; returns their checkpoints. A teacher of the
    student's architecture (self-distillation) is the fine-tuned student itself, not a second copy."""
    ckpts, jobs = {}, []
    for role in ("student", "teacher"):
        model = getattr(base, role).name
        if role == "teacher" and model == base.student.name:  # self-distillation: the float student teaches
            ckpts[role] = ckpts["student"]
            continue
        cfg = base.model_copy(deep=True)
        cfg.name = f"fp-{role}-{model}-s{cfg.seed}"
        mcfg = getattr(cfg, role)
        mcfg.checkpoint = str(data_dir / "weights" / PRETRAINED[model])
        mcfg.train_epochs, mcfg.lr = budget["fp_epochs"], 0.01
        cfg.data.train_limit = budget["fp_train_limit"]
        jobs.append((cfg, [pipeline.model_float_stage(cfg, role)]))
        ckpts[role] = out / cfg.name / "checkpoints" / f"fp_{role}.pt"
    run_parallel(run_or_reuse, [(cfg, out, stages) for cfg, stages in jobs], min(parallel, len(jobs)))
    return ckpts


def method_config(
    base: RunConfig, ckpts: dict[str, Path], budget: dict, bits: int, method: str, overrides: list[str] = ()
) -> RunConfig:
    cfg = with_overrides(base, list(overrides)) if overrides else base.model_copy(deep=True)
    cfg.name = f"w{bits}a{bits}-{method}-{cfg.teacher.name}-s{cfg.seed}"
    cfg.method, cfg.epochs = method, budget["epochs"]
    cfg.data.train_limit = budget["train_limit"]
    for role in ("teacher", "student"):
        mcfg = getattr(cfg, role)
        mcfg.checkpoint, mcfg.train_epochs = str(ckpts[role].resolve()), 0
    cfg.quant.weight_bits = cfg.quant.act_bits = bits
    return cfg


def collect(out: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        rows.append({"run": name, "summary": summary, "history": read_history(out / name)})
    return rows


def table(rows: list[dict], fp: dict) -> str:
    """Method x bits: test top-1 (mean over seeds, and each seed), the final epoch's validation top-1 (mean;
    what choices are made on) and each seed's wall time, with the float references."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in rows:
        s = r["summary"]
        cell = cells.setdefault((s["method"], s["bits"]["weight"]), {"test": [], "val": [], "wall": []})
        cell["test"].append(100 * _final(s))
        cell["val"].append(100 * r["history"][-1]["val_acc"])
        cell["wall"].append(s["wall_s"])
    bits = sorted({b for _, b in cells}, reverse=True)
    head = "| method | " + " | ".join(f"W{b}A{b} test % | val % | wall s" for b in bits) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(bits)]
    for m in METHODS:
        parts = []
        for b in bits:
            cell = cells.get((m, b))
            if cell is None:
                parts += ["", "", ""]
                continue
            test = cell["test"]
            per_seed = f" ({'/'.join(f'{a:.2f}' for a in test)})" if len(test) > 1 else ""
            parts += [f"{statistics.mean(test):.2f}{per_seed}", f"{statistics.mean(cell['val']):.2f}",
                      "/".join(f"{w:.0f}" for w in cell["wall"])]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(parts) + " |")
    ref = f"Float references (test %): student {100 * fp['student']:.2f}, teacher {100 * fp['teacher']:.2f}."
    return "\n".join(lines) + "\n\n" + ref


def _final(summary: dict) -> float:
    return list(summary["stages"].values())[-1]["test"]


def _seed(row: dict) -> int:
    return int(row["run"].rsplit("-s", 1)[1])


def plots(rows: list[dict], fp: dict, prefix: Path) -> list[Path]:
    """Test accuracy against bits per method, and per bit-width the per-epoch curves (drawn by
    qkd.report.figures, as qkd report draws)."""
    made = []
    seeds = sorted({_seed(r) for r in rows})
    style = {seed: ("-", "--", ":", "-.")[i % 4] for i, seed in enumerate(seeds)}
    fig, (ax,) = plot.figure(size=(6, 4))
    points: dict[str, list[tuple[int, float]]] = {}
    for m in METHODS:  # the mean over seeds as a line, each seed as a point
        for r in (r for r in rows if r["summary"]["method"] == m):
            points.setdefault(m, []).append((r["summary"]["bits"]["weight"], 100 * _final(r["summary"])))
    plot.bits_plot(ax, points, [plot.Reference("float ResNet-20", 100 * fp["student"])])
    title = "CIFAR-10 (JPEG), ResNet-20 student" + (f": mean of {len(seeds)} seeds (points)" if len(seeds) > 1 else "")
    ax.set_title(title)
    made.append(plot.save(fig, prefix.with_name(prefix.name + "-bits.png")))
    for bits in sorted({r["summary"]["bits"]["weight"] for r in rows}):
        fig, (ax,) = plot.figure(size=(7, 4))
        curves = []
        for r in (r for r in rows if r["summary"]["bits"]["weight"] == bits):
            acc, m, seed = [100 * h["val_acc"] for h in r["history"]], r["summary"]["method"], _seed(r)
            ends = list(itertools.accumulate(s["epochs"] for s in r["summary"]["stages"].values()))
            bounds = [(e + 0.5, "") for e in ends if 0 < e < len(acc)]  # phase boundaries, in the method's colour
            label = m if seed == seeds[0] else f"{m} seed {seed}"
            curves.append(plot.Curve(label, list(range(1, len(acc) + 1)), acc, plot.method_colour(m), style[seed],
                                     bounds))  # fmt: skip
        plot.curves_plot(ax, curves)
        ax.set_title(f"W{bits}A{bits}: per-epoch curves (dotted verticals: phase ends)")
        made.append(plot.save(fig, prefix.with_name(f"{prefix.name}-curves-w{bits}a{bits}.png")))
    return made


def main(
    budget: str = "cpu-short",
    bits: list[int] = typer.Option([2, 4], help="bit-widths (W = A) to study"),
    methods: list[str] = typer.Option(METHODS, help="methods to run"),
    seeds: list[int] = typer.Option([0], help="seeds; each adds a full set of runs"),
    teacher: str = TEACHER,
    device: str = "auto",
    data_dir: Path = DATA_DIR,
    out: Path = ROOT / "runs",
    append: bool = True,
    jobs: int = typer.Option(1, min=1, help="runs at once, each in its own process (for a GPU: about 5)"),
    epochs: int | None = typer.Option(None, min=1, help="quantized epochs per method instead of the budget's"),
    set_: list[str] = typer.Option([], "--set", help="config override for every method, e.g. quant.method=interval"),
    tag: str = typer.Option("", help="name of the variant that --set makes (its runs, JSON and plots)"),
) -> None:
    """Run (or resume) the study and write docs/accuracy-<budget>.json, plots and a RESULTS.md section."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if budget not in BUDGETS:
        raise typer.BadParameter(f"budget must be one of {', '.join(BUDGETS)}")
    if not (data_dir / "cifar10-jpeg-train.npz").is_file():
        raise typer.BadParameter(f"no cifar10-jpeg-train.npz in {data_dir}; pass --data-dir")
    if bool(set_) != bool(tag):
        raise typer.BadParameter("--set and --tag go together: a variant needs a name to keep its runs apart")
    # Another epoch count, variant or teacher gets its own folders (runs, JSON, plots) beside the plain study.
    name = f"accuracy-{budget}" + (f"-e{epochs}" if epochs else "") + (f"-{tag}" if tag else "")
    name += f"-{teacher}-teacher" if teacher != TEACHER else ""
    b, fp_out, out = dict(BUDGETS[budget]), out / f"accuracy-{budget}", out / name
    b["epochs"] = epochs or b["epochs"]
    t0, names, fp = time.time(), [], {}
    for seed in seeds:
        base = base_config(data_dir, teacher, device, seed)
        ckpts = float_step(base, data_dir, b, fp_out, jobs)
        for role, path in ckpts.items():
            summary = json.loads((path.parent.parent / "summary.json").read_text())
            fp.setdefault(role, []).append(summary["stages"][path.stem]["test"])
        cfgs = [method_config(base, ckpts, b, w, m, set_) for w in bits for m in methods]
        run_parallel(run_or_reuse, [(cfg, out) for cfg in cfgs], jobs)
        names += [cfg.name for cfg in cfgs]
    rows = collect(out, names)
    fp_mean = {k: statistics.mean(v) for k, v in fp.items()}
    prefix = ROOT / "docs" / name
    (prefix.with_suffix(".json")).write_text(json.dumps({"budget": b, "float_test": fp, "runs": rows}, indent=1))
    figures = plots(rows, fp_mean, prefix)
    command, variant = command_line(), f", variant {tag} ({' '.join(set_)})" if tag else ""
    variant += f", {epochs} epochs" if epochs else ""
    variant += f", {teacher} teacher" if teacher != TEACHER else ""
    models = (
        f"ResNet-20 student, {teacher} teacher, both"
        if teacher != base.student.name
        else "ResNet-20 student, taught by its own float model (self-distillation),"
    )
    text = (
        f"\n### CIFAR-10 (JPEG copy) accuracy study, budget {budget}{variant}, {time.strftime('%Y-%m-%d')}\n\n"
        f"Machine: {machine()}.\n"
        f"{models} fine-tuned from the pretrained checkpoints for "
        f"{b['fp_epochs']} epoch(s) on {b['fp_train_limit'] or 45_000} training images (step 0); "
        f"each method then trains {b['epochs']} epochs on {b['train_limit'] or 45_000} training images; "
        f"5,000 held out for validation; test = the 10,000 test images. "
        f"Wall time of the whole study: {(time.time() - t0) / 60:.0f} min (cached runs count as 0).\n"
        f"Command: `{command.strip()}`\n\n{table(rows, fp_mean)}\n\n"
        + "".join(f"![{f.stem}]({f.name})\n" for f in figures)
    )
    publish(text, append)


if __name__ == "__main__":
    typer.run(main)
