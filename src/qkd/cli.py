"""The ``qkd`` command line: run, resume, train a float model, evaluate, inspect configs.

Configs are a preset name or YAML path followed by ``key=value`` overrides, e.g.
``qkd run cifar10-resnet20-w4a4 quant.weight_bits=2 epochs=40``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from qkd.config import RunConfig, dump_config, list_presets, load_config
from qkd.errors import QKDError, Stopped

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Quantization-aware Knowledge Distillation: low-bit students from float models.",
)

ConfigArgs = Annotated[
    list[str] | None,
    typer.Argument(help="A preset name or YAML file (optional), then key=value overrides.", show_default=False),
]
# readable=False: a folder that cannot be read is reported by our own one-line checks, not click's boxed error
Out = Annotated[Path, typer.Option(help="Parent folder of run folders.", readable=False)]
Name = Annotated[str | None, typer.Option(help="Run folder name (default: data-model-method-time).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing run folder of the same name.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 or auto (CUDA when present).")]
Resume = Annotated[
    Path | None,
    typer.Option(
        help="Continue this interrupted run folder; key=value arguments then change settings that leave "
        "models and data as they are (optim.*, distill.*, runtime.*, device), e.g. optim.lr=0.01."
    ),
]
Role = Annotated[str, typer.Option(help="Which model of the config to train: teacher or student.")]


def _config(args: list[str] | None, name: str | None = None, device: str | None = None) -> RunConfig:
    args = list(args or [])
    source = args.pop(0) if args and "=" not in args[0] else None
    extra = [f"name={name}"] * bool(name) + [f"device={device}"] * bool(device)
    return load_config(source, args + extra)


def _setup_logging() -> None:
    # rank 0 logs (under torchrun its environment says which rank this is, before the group is joined)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def _report(run_dir: Path, summary: dict) -> None:
    from qkd.distributed import is_main_process
    from qkd.report.summary import finished_run

    if is_main_process():
        typer.echo(finished_run(run_dir, summary))


@app.command()
def run(
    args: ConfigArgs = None,
    out: Out = Path("runs"),
    name: Name = None,
    overwrite: Overwrite = False,
    device: Device = None,
    resume: Resume = None,
) -> None:
    """Run QKD (or a baseline) end to end. With no arguments: the built-in digits demo."""
    _setup_logging()
    cfg = _config(args, name, device) if resume is None else None  # refused before torch is imported
    from qkd import pipeline

    restarted = pipeline.restarted_run(out, name) if resume is None else None
    if restarted is not None:  # the same command again: its own run folder, as it was configured
        _report(*_interruptible(lambda: pipeline.resume(restarted), restarted))
        return
    if resume is not None:
        if args and "=" not in args[0]:
            raise QKDError(
                "--resume takes the run folder's own config; give only key=value changes (e.g. optim.lr=0.01)"
            )
        _report(*_interruptible(lambda: pipeline.resume(resume, args), resume))
        return
    _start(cfg, out, overwrite)


def _start(cfg: RunConfig, out: Path, overwrite: bool, stages=None) -> Path:
    from qkd import pipeline
    from qkd.distributed import on_main, setup

    setup(cfg.device)  # under torchrun: one run over all ranks; its folder and name are rank 0's
    run_dir = on_main(lambda: pipeline.new_run_dir(cfg, out, overwrite))
    cfg.name = run_dir.name  # the time-stamped default name, fixed once
    _report(*_interruptible(lambda: pipeline.run(cfg, out, overwrite=overwrite, stages=stages), run_dir))
    return run_dir


def _interruptible(fn, run_dir: Path):
    try:
        return fn()
    except Stopped as e:  # typer turns any KeyboardInterrupt into exit 130: say it here
        typer.echo(f"qkd: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:  # the second Ctrl-C: stopped at once, the last saved checkpoint is intact
        typer.echo(f"\ninterrupted; continue with: qkd run --resume {run_dir}", err=True)
        raise typer.Exit(130) from None


@app.command("train-fp")
def train_fp(
    args: ConfigArgs = None,
    role: Role = "teacher",
    out: Out = Path("runs"),
    name: Name = None,
    overwrite: Overwrite = False,
    device: Device = None,
) -> None:
    """Train or fine-tune a float model (usually the teacher); its checkpoint can seed later runs.

    Its epochs and learning rate are ``<role>.train_epochs`` and ``<role>.lr``; ``epochs=N`` sets the epochs too."""
    from qkd import pipeline

    if role not in ("teacher", "student"):
        raise QKDError(f"--role must be teacher or student, not '{role}'")
    cfg = _config(args, name, device)
    if any(a.startswith("epochs=") for a in args or []):  # the float model's epochs, here
        getattr(cfg, role).train_epochs = cfg.epochs
    if getattr(cfg, role).train_epochs == 0:
        raise QKDError(f"{role}.train_epochs is 0; set e.g. {role}.train_epochs=30")
    _setup_logging()
    run_dir = _start(cfg, out, overwrite, stages=[pipeline.model_float_stage(cfg, role)])
    typer.echo(f"checkpoint: {run_dir / 'checkpoints' / f'fp_{role}.pt'}  (use as {role}.checkpoint=...)")


Backend = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "--engine",
        help="torch (the fake-quant model, the default for a run or checkpoint), int (the integer runtime), onnx "
        "(QDQ) or onnx-int (ConvInteger), run by onnxruntime, or executorch (.pte, XNNPACK). With a run or "
        "checkpoint, int/onnx/onnx-int/executorch export it "
        "afresh to a temporary file and compare; with an exported file, the file's own format (the default there). "
        "--engine is its old name.",
        show_default=False,
    ),
]
Verify = Annotated[
    int,
    typer.Option(
        help="Test images on which the export is checked against the trained model: 1 or more (a test split "
        "holding fewer is checked whole)."
    ),
]


TargetRole = Annotated[
    str | None, typer.Option("--role", help="teacher or student (default: the model the run trained last).")
]
Unfinished = Annotated[
    bool, typer.Option(help="Use the model of a run that has not finished, as it is now (say so in what you report).")
]
FIT_RUN = " A qkd.fit run takes its model and data by import path: student.name=mymod:fn data.name=mymod:fn."
Target = Annotated[Path, typer.Argument(help="A run folder or a checkpoint file (it carries its settings)." + FIT_RUN)]
EvalTarget = Annotated[
    Path,
    typer.Argument(
        help="A run folder, a checkpoint file, or a file written by qkd export (student-int.safetensors, "
        "student-onnx.onnx, student-onnx-int.onnx, student-executorch.pte, or any --out name): that very file is "
        "evaluated on its run's test split, the images prepared as its metadata says." + FIT_RUN
    ),
]


@app.command("eval")
def eval_(
    target: EvalTarget,
    args: ConfigArgs = None,
    device: Device = None,
    backend: Backend = None,
    role: TargetRole = None,
    unfinished: Unfinished = False,
) -> None:
    """Top-1 accuracy (%) of a run's model: as trained (fake-quant), with quantization off, or exported and run by
    another backend; or of an exported file (qkd eval runs/<name>/export/student-onnx.onnx), which takes
    data.root=... (data.num_workers, data.eval_batch_size, data.download, data.decode) where its run's data
    has moved."""
    from qkd.export.formats import check_format

    if backend not in (None, "torch"):  # before the run is read: a misspelt backend is one line, nothing else printed
        check_format(backend)
    from qkd import trained
    from qkd.report.summary import describe_loaded, pct

    if trained.is_export_file(target):
        if device not in (None, "cpu") or role is not None or unfinished:
            raise QKDError(f"{target} is an exported file: it runs on the CPU, holds the student and was finished "
                           "when exported; drop --device, --role and --unfinished")  # fmt: skip
        _eval_export(target, args, backend)
        return
    backend = backend or "torch"
    r = trained.load_target(target, args, device if backend == "torch" else "cpu", role, unfinished)
    typer.echo(f"{target}: {describe_loaded(r)}")
    if backend != "torch":
        _eval_fresh_export(r, target, backend)
        return
    result = trained.evaluate_loaded(r)
    rows = [(f"{k} top-1 %", result[k]) for k in ("val", "test") if k in result]
    rows += [(f"{k} top-1 % quantizers off", result[f"{k}_fp"]) for k in ("val", "test") if f"{k}_fp" in result]
    for label, v in rows:
        typer.echo(f"  {label:28s} {pct(v)}")
    if r.quantized:
        typer.echo("  (quantizers off: the same weights run in float; not a float-trained model)")


def _eval_fresh_export(r, target: Path, backend: str) -> None:
    """A run's model exported afresh to a temporary file, run by ``backend`` and compared with the model."""
    from qkd.export import default_path
    from qkd.export.api import compare_fresh_export
    from qkd.report.summary import pct

    result = compare_fresh_export(r, backend, default_path(target, backend).name)
    percent = ("acc", "agreement", "agreement_f64")
    for k, v in result.items():
        if k != "engine_acc":  # export_acc's old name
            typer.echo(f"  {k:20s} {pct(v) if isinstance(v, float) and k.endswith(percent) else v}")
    typer.echo(f"  (exported afresh to a temporary file; to evaluate a file you exported, give it: qkd eval "
               f"{default_path(target, backend)})")  # fmt: skip


def _eval_export(path: Path, args: list[str] | None, backend: str | None) -> None:
    from qkd.export import evaluate_export
    from qkd.report.summary import pct

    if backend == "torch":
        raise QKDError(f"{path} is an exported file; --backend torch evaluates a run or checkpoint (give "
                       "--backend int, onnx, onnx-int or executorch, or none)")  # fmt: skip
    result = evaluate_export(path, list(args or []), backend)
    c = result["contract"]
    bits = f"W{c.get('weight_bits', '?')}A{c.get('act_bits', '?')} {c.get('quantizer', '')}".rstrip()
    runtime = {"int": "the integer runtime", "executorch": "ExecuTorch (XNNPACK)"}.get(result["export_format"],
                                                                                    "onnxruntime")  # fmt: skip
    typer.echo(f"{path}: {result['export_format']} export of {c.get('model', 'a model')} {bits}, trained to "
               f"{c.get('trained_to', '?')}, run by {runtime}")  # fmt: skip
    typer.echo(f"  input: {c.get('preprocessing', '?')}")
    typer.echo(f"  {result['split'] + ' top-1 %':28s} {pct(result['top1'])}  ({result['images']} images)")


Format = Annotated[
    str,
    typer.Option(
        "--format",
        help="int (packed integers, safetensors), onnx (QDQ, runs in float32), onnx-int (integer convolutions "
        "and float64 requantization: the trained model's exact answers) or executorch (.pte lowered to XNNPACK, int8 "
        "where XNNPACK can; needs pip install 'qkd-distill[executorch]').",
    ),
]
ExportOut = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Output file (default: <run>/export/student-int.safetensors, student-onnx.onnx, "
        "student-onnx-int.onnx or student-executorch.pte; student-onnx-baked.onnx etc. with --bake-preprocessing).",
        readable=False,
    ),
]
Bake = Annotated[
    bool,
    typer.Option(
        help="ONNX formats: the file takes raw pixel values (0..255, or the digits' 0..16) and normalises them "
        "in its graph; without it the file takes normalised images. Either way its metadata says which."
    ),
]


FourBit = Annotated[
    bool,
    typer.Option(
        help="--format onnx: store codes of 4 bits or fewer in INT4/UINT4 (opset 21; about half the file) instead "
        "of INT8/UINT8; onnxruntime then runs those layers in float (no 4-bit integer kernels)."
    ),
]


@app.command()
def export(
    target: Target,
    args: ConfigArgs = None,
    format: Format = "int",
    out: ExportOut = None,
    verify: Verify = 1000,
    unfinished: Unfinished = False,
    bake_preprocessing: Bake = False,
    four_bit_storage: FourBit = False,
) -> None:
    """Export the quantized student with its input contract (layout, size, normalisation, classes, bits, in the
    file's metadata) and check it against the trained model on test images."""
    from qkd.export.formats import check_format, check_limit

    check_format(format, bake_preprocessing, four_bit_storage)  # before the run is read (and torch is imported)
    check_limit(verify, "--verify")
    from qkd import trained
    from qkd.export import default_path, export_loaded
    from qkd.export.api import require_quantized
    from qkd.report.summary import describe_loaded

    path = out or default_path(target, format, bake_preprocessing)
    r = trained.load_target(target, args, "cpu", "student", unfinished)
    require_quantized(r, target)
    typer.echo(f"{target}: {describe_loaded(r)}")
    exported = export_loaded(r, format, path, bake_preprocessing=bake_preprocessing, verify=verify,
                             four_bit_storage=four_bit_storage)  # fmt: skip
    size, fp = path.stat().st_size, exported.contract["float32_bytes"]
    typer.echo(
        f"wrote {path}: {size / 1024:.1f} KiB; float32 checkpoint {fp / 1024:.1f} KiB ({fp / size:.1f}x smaller)"
    )
    typer.echo(f"input: {exported.contract['preprocessing']}")
    if format == "onnx":
        from qkd.export.api import code_storage

        typer.echo(code_storage(path))
    check, split = exported.check, exported.split
    typer.echo(
        f"checked on {check['images']} {split} images against the trained model: top-1 agreement "
        f"{100 * check['agreement_f64']:.2f} % with its exact (float64) answers, {100 * check['agreement']:.2f} % "
        f"with its float32 evaluation; max |logit diff| {check['max_logit_diff_f64']:.2e} / "
        f"{check['max_logit_diff']:.2e}; accuracy {100 * check['export_acc']:.2f} % "
        f"(fake-quant {100 * check['fake_quant_acc']:.2f} %)"
    )


@app.command()
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run folders, or folders holding run folders (e.g. runs).", show_default=False),
    ],
    out: Annotated[
        Path, typer.Option(help="Folder for report.html, report.md and the figures (PNG).", readable=False)
    ] = Path("report"),
) -> None:
    """Compare runs: a table (method, bits, float and per-phase accuracy, int export size, wall time), figures
    (accuracy per epoch with phase boundaries, accuracy against bits) and one self-contained HTML page."""
    from qkd.report import load_runs, write_report

    made = write_report(load_runs(runs), out)
    typer.echo(made.text)
    typer.echo(f"\nwrote {made.html} (open it in a browser; figures inside), {made.markdown}, "
               + ", ".join(str(p) for p in made.figures))  # fmt: skip


@app.command()
def config(args: ConfigArgs = None) -> None:
    """Print the resolved config (preset + overrides) as YAML."""
    typer.echo(dump_config(_config(args)), nl=False)


@app.command("list")
def list_() -> None:
    """Models, data sets, methods and presets available by name."""
    from qkd.config import DATA_NAMES, MODEL_NAMES
    from qkd.methods import METHODS

    for title, names in (
        ("models", MODEL_NAMES),
        ("data sets", DATA_NAMES),
        ("methods", list(METHODS)),
        ("presets", list_presets()),
    ):
        typer.echo(f"{title}: {', '.join(names)}")


def _rank() -> int:
    """The rank that says an error; torchrun's ``RANK`` while torch is not even imported (a refusal on reading)."""
    if "torch.distributed" not in sys.modules:
        return int(os.environ.get("RANK", "0"))
    from qkd.distributed import launch_rank

    return launch_rank()


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if not e.code and "torch.distributed" in sys.modules:  # a torchrun job done: leave its group together
            from qkd.distributed import teardown

            teardown()
        raise
    except QKDError as e:
        rank = _rank()
        if rank == 0:
            typer.echo(f"qkd: error: {e}", err=True)
        elif not getattr(e, "reported_by_rank_0", False):  # a failure of this rank alone
            typer.echo(f"qkd: error (rank {rank}): {e}", err=True)
        else:  # leave rank 0 the time to say it before torchrun, seeing this rank exit, stops the others
            time.sleep(2)
        sys.exit(getattr(e, "exit_code", 2))
