"""Fault injection: a ``qkd run`` killed at random moments and resumed ends bit-identical to one never killed.

What it checks: ``qkd run`` is started on the built-in digits data (CPU, one thread, every QKD stage:
fp_teacher, fp_student, 1_self_study, 2_co_study, 3_tutor) and killed with SIGKILL, either

* ``time``: at a uniformly random moment of the run's training window, or
* ``write``: the moment the 1st, 2nd or 3rd checkpoint temporary file (``checkpoints/.*.tmp``) appears
  after a random epoch's end (the folder is polled without pause), so that the kill lands while
  ``last.pt`` or a stage checkpoint is being written (a ``.tmp`` left behind proves it).

The training window of a process opens when it has finished its first epoch (a new line in
``metrics.jsonl``; before that, seconds go to start-up and torch's warm-up, and nothing is written) and
spans what the reference run took for the epochs still to do.

Then ``qkd run --resume RUN`` continues it (in some trials that resume is killed too, so resumes of
resumes are covered) until the run finishes. The final ``checkpoints/last.pt`` must hold a student and
a teacher whose every tensor equals (``torch.equal``) those of a reference run that was never killed.
Only the ``student`` and ``teacher`` entries are compared; the other keys of a checkpoint may change.

Run it (a few minutes on two cores; exits non-zero if any trial differs or any resume fails)::

    .venv/bin/python scripts/fault_injection.py --trials 24
    .venv/bin/python scripts/fault_injection.py --trials 3 --jobs 2 --out /tmp/fi --json /tmp/fi/trials.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Small but complete: every stage of the QKD method (10 epochs), 3-6 s of training on one CPU thread.
CONFIG = ["method=qkd", "epochs=6", "teacher.train_epochs=2", "student.train_epochs=2", "teacher.kwargs={width: 8}",
          "data.batch_size=128", "device=cpu"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MAX_PROCESSES = 6  # the first run and its resumes, per trial


# ----- the runs ----------------------------------------------------------------------------------
def start_run(run_dir: Path, log: Path) -> subprocess.Popen:
    """``qkd run`` into ``run_dir`` if it has no config yet, else ``qkd run --resume run_dir``."""
    if (run_dir / "config.yaml").is_file():
        args = ["--resume", str(run_dir)]
    else:
        args = [*CONFIG, "--name", run_dir.name, "--out", str(run_dir.parent)]
    out = log.open("w")
    cmd = [sys.executable, "-m", "qkd", "run", *args]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    out.close()  # the child holds its own copy
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run and anything it started (its own session), unless it has already ended."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tmp_files(ckpts: Path) -> set[str]:
    """Names of the temporary files in a checkpoint folder (none when it does not exist yet)."""
    try:
        with os.scandir(ckpts) as it:
            return {e.name for e in it if e.name.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def leftovers(run_dir: Path) -> set[str]:
    """Every temporary file in the run folder, relative to it."""
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp")}


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


# ----- the reference -----------------------------------------------------------------------------
@dataclass
class Reference:
    run_dir: Path
    startup_s: float  # process start until config.yaml (imports, data, models)
    warmup_s: float  # config.yaml until the first epoch is done (metrics.jsonl): torch's first steps
    train_s: float  # the first epoch done until summary.json: the training window
    epochs: int  # lines of metrics.jsonl


def run_reference(run_dir: Path) -> Reference:
    """One uninterrupted run, timed."""
    log = run_dir.parent / f"{run_dir.name}.log"
    t = [time.perf_counter()]  # start, config.yaml, metrics.jsonl, summary.json
    proc = start_run(run_dir, log)
    while proc.poll() is None:
        if len(t) < 4 and (run_dir / ["config.yaml", "metrics.jsonl", "summary.json"][len(t) - 1]).is_file():
            t.append(time.perf_counter())
        time.sleep(0.002)
    if proc.returncode != 0 or len(t) < 4:
        raise SystemExit(f"the reference run failed (exit {proc.returncode}); see {log}")
    return Reference(run_dir, t[1] - t[0], t[2] - t[1], t[3] - t[2], epochs_done(run_dir))


# ----- one kill ----------------------------------------------------------------------------------
@dataclass
class Kill:
    kind: str  # time, write, or none (the last process, left to finish)
    at_s: float | None = None  # seconds after the process started; None: it ended before the kill
    rc: int | None = None
    where: str = ""  # stage and epoch in progress, or the epoch whose file was being written
    stage: str = ""
    left_tmp: list[str] = field(default_factory=list)  # temp files the kill left behind (run-folder relative)

    @property
    def interrupted(self) -> bool:
        return self.rc == -signal.SIGKILL

    @property
    def during_write(self) -> bool:
        return any(p.startswith("checkpoints/") for p in self.left_tmp)


def epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def position(run_dir: Path, left_tmp: list[str]) -> tuple[str, str]:
    """(stage, description) of the moment of a kill, from metrics.jsonl's last line and stages.json."""
    if finished(run_dir):
        return "finished", "finished"
    done = metrics(run_dir)
    if left_tmp:  # a write belongs to the last epoch finished
        last = done[-1] if done else {"stage": "-", "epoch": 0, "epochs": 0}
        names = ", ".join(sorted(Path(p).name[1:].rsplit(".", 2)[0] for p in left_tmp))  # .last.pt.x.tmp
        return last["stage"], f"{last['stage']} {last['epoch']}/{last['epochs']} writing {names}"
    stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").is_file() else []
    epochs = [(s["key"], e + 1, s["epochs"]) for s in stages for e in range(s["epochs"])]
    if len(done) >= len(epochs):
        return "end", "after the last epoch"
    stage, epoch, of = epochs[len(done)]
    return stage, f"{stage} {epoch}/{of}"


def wait_for_write(proc: subprocess.Popen, run_dir: Path, epoch: int, nth: int) -> None:
    """Return when the ``nth`` checkpoint temp file written after ``epoch`` epochs appears (or the process
    ends). Sleeps until the epoch before; from then on, polls without pause."""
    while proc.poll() is None and epochs_done(run_dir) < epoch - 1:
        time.sleep(0.002)
    seen, n = tmp_files(run_dir / "checkpoints"), 0
    while proc.poll() is None:
        new = tmp_files(run_dir / "checkpoints") - seen
        if new:
            seen |= new
            n += len(new) * (epochs_done(run_dir) >= epoch)  # a write of an earlier epoch does not count
            if n >= nth:
                return


def wait_until(proc: subprocess.Popen, deadline: float) -> None:
    while proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(min(0.005, max(0.0, deadline - time.perf_counter())))


def run_once(run_dir: Path, log: Path, kind: str, ref: Reference, rng: random.Random) -> Kill:
    """Start (or resume) the run and kill it as ``kind`` says, or let it finish (``none``)."""
    done = epochs_done(run_dir)
    window = 0.95 * ref.train_s * max(0.05, (ref.epochs - done - 1) / (ref.epochs - 1))  # epochs after the next
    before = leftovers(run_dir)  # left by earlier kills
    t0 = time.perf_counter()
    proc = start_run(run_dir, log)
    if kind == "time":
        while proc.poll() is None and epochs_done(run_dir) == done:  # the window opens
            time.sleep(0.002)
        wait_until(proc, time.perf_counter() + rng.uniform(0, window))
    elif kind == "write":
        wait_for_write(proc, run_dir, rng.randint(min(done + 1, ref.epochs), ref.epochs), rng.randint(1, 3))
    at = time.perf_counter() - t0
    if kind != "none":
        kill(proc)
    proc.wait()
    left = sorted(leftovers(run_dir) - before)
    result = Kill(kind, at if proc.returncode == -signal.SIGKILL else None, proc.returncode, left_tmp=left)
    if result.interrupted:
        result.stage, result.where = position(run_dir, left)
    return result


# ----- one trial ---------------------------------------------------------------------------------
@dataclass
class Trial:
    trial: int
    run_dir: str
    kills: list[Kill] = field(default_factory=list)
    resumes: int = 0
    identical: bool = False
    error: str = ""


def plan(trial: int) -> list[str]:
    """The kills of a trial: every third is killed at a checkpoint write, every third killed again on resume."""
    first = "write" if trial % 3 == 2 else "time"
    if trial % 3 != 1:
        return [first]
    return [first, "write" if trial % 6 == 4 else "time"]


def run_trial(trial: int, out: Path, ref: Reference, rng: random.Random) -> Trial:
    run_dir = out / f"trial-{trial:02d}"
    result = Trial(trial, str(run_dir))
    kinds = plan(trial)
    for n in range(MAX_PROCESSES):
        log = out / f"trial-{trial:02d}.{n}.log"
        k = run_once(run_dir, log, kinds[n] if n < len(kinds) else "none", ref, rng)
        result.resumes = n
        if n < len(kinds):
            result.kills.append(k)
        if not k.interrupted and k.rc != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            result.error = f"process {n} ({'resume' if n else 'first run'}) exited {k.rc}; {log}:\n{tail}"
            return result
        if k.rc == 0 and finished(run_dir):
            break
    else:
        result.error = f"not finished after {MAX_PROCESSES} processes"
        return result
    result.identical, result.error = compare(ref.run_dir, run_dir)
    return result


def compare(ref_dir: Path, run_dir: Path) -> tuple[bool, str]:
    """Every tensor of last.pt's student and teacher equal to the reference's."""
    a, b = (
        torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=True) for d in (ref_dir, run_dir)
    )
    diffs = []
    for role in ("student", "teacher"):
        x, y = a.get(role), b.get(role)
        if x is None or y is None:
            diffs += [f"{role}: present in one only"] if (x is None) != (y is None) else []
            continue
        if x.keys() != y.keys():
            diffs.append(f"{role}: keys differ ({sorted(x.keys() ^ y.keys())[:3]})")
        for key in sorted(x.keys() & y.keys()):
            same = torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key]
            if not same or getattr(x[key], "dtype", None) != getattr(y[key], "dtype", None):
                diffs.append(f"{role}.{key}")
    return not diffs, ("differs: " + ", ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")) if diffs else ""


# ----- report ------------------------------------------------------------------------------------
def row(t: Trial) -> list[str]:
    def join(f) -> str:
        return " + ".join(f(k) for k in t.kills)

    return [
        str(t.trial),
        join(lambda k: f"{k.at_s:.2f}s" if k.interrupted else "ended"),
        join(lambda k: k.kind),
        join(lambda k: k.where if k.interrupted else "not interrupted"),
        join(lambda k: "yes" if k.during_write else "no"),
        str(t.resumes),
        "yes" if t.identical else "FAILED" if t.error and not t.error.startswith("differs") else "NO",
    ]


def table(trials: list[Trial]) -> str:
    rows = [["trial", "kill at", "kind", "at kill", "during write", "resumes", "identical"], *map(row, trials)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def verdict(trials: list[Trial]) -> str:
    kills = [k for t in trials for k in t.kills]
    stages = sorted({k.stage for k in kills if k.interrupted}, key=lambda s: (s in ("end", "finished"), s))
    missed = sum(not k.interrupted for k in kills)
    untouched = sum(not any(k.interrupted for k in t.kills) for t in trials)
    line = (
        f"{sum(t.identical for t in trials)}/{len(trials)} trials bit-identical "
        f"({sum(k.during_write for k in kills)} killed during a checkpoint write; stages hit: {', '.join(stages)}"
    )
    if missed:
        line += f"; {missed} kills came after the process had ended, {untouched} trials never interrupted"
    return line + ")"


def run_trials(numbers: range, out: Path, ref: Reference, seed: int, jobs: int) -> list[Trial]:
    """The trials, ``jobs`` at a time (each a chain of single-threaded processes); each trial draws its kill
    moments from its own generator (``seed``, trial number), so that they do not depend on ``jobs``."""

    def one(i: int) -> Trial:
        trial = run_trial(i, out, ref, random.Random(f"{seed}-{i}"))
        print(f"trial {i}: " + ", ".join(row(trial)[1:]), file=sys.stderr, flush=True)
        return trial

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, numbers))


# ----- main --------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=24, help="number of killed-and-resumed runs (default 24)")
    p.add_argument("--first", type=int, default=0, help="number of the first trial (its kinds of kill: see plan)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--out", type=Path, help="folder for the run folders and logs (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the trials here as JSON")
    p.add_argument("--jobs", type=int, default=1, help="trials run side by side (each process has one thread)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="qkd-fault-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        ref = run_reference(out / "reference")
        print(f"reference: start-up {ref.startup_s:.1f} s, first epoch {ref.warmup_s:.1f} s, then "
              f"{ref.train_s:.1f} s for {ref.epochs - 1} epochs; runs in {out}", flush=True)  # fmt: skip
        trials = run_trials(range(args.first, args.first + args.trials), out, ref, args.seed, args.jobs)
        print(table(trials))
        print(verdict(trials))
        for t in trials:
            if t.error:
                print(f"trial {t.trial}: {t.error}", file=sys.stderr)
        if args.json:
            report = {"reference": {**asdict(ref), "run_dir": str(ref.run_dir)}, "config": CONFIG,
                      "trials": [{**asdict(t), "kills": [{**asdict(k), "interrupted": k.interrupted,
                                                          "during_write": k.during_write} for k in t.kills]}
                                 for t in trials]}  # fmt: skip
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(t.identical and not t.error for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
