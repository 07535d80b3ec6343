import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import qkd_in_process
from qkd.distributed import broadcast_state, is_main_process, rank, resolve_device
from qkd.models import create_model
from qkd.quant import QuantConfig, calibrate, quantize_model


def test_single_process_defaults():
    assert rank() == 0 and is_main_process()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_broadcast_inside_a_process_group(tmp_path):
    """Under a (one-process, gloo) group the broadcast runs and leaves rank 0's state intact."""
    model = quantize_model(create_model("tiny_cnn", width=4), QuantConfig())
    calibrate(model, torch.randn(8, 1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        broadcast_state(model)
        assert is_main_process()
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----- torchrun: real processes, gloo on the CPU --------------------------------------------------------
# No BatchNorm (its per-rank statistics differ by design; SyncBatchNorm needs GPUs): the two runs must then
# take the same steps, up to float rounding (sums over 100 images or over 2 x 50 differ in the last bit), which
# fake-quantization amplifies where a value sits on a rounding boundary: a few steps of each phase, 8 bits.
EQUAL = ["student.name=tiny_mlp", "teacher.name=tiny_mlp", "teacher.kwargs={hidden: 32}", "data.train_limit=400",
         "data.batch_size=100", "teacher.train_epochs=1", "student.train_epochs=1", "device=cpu",
         "quant.weight_bits=8", "quant.act_bits=8",
         "phases=[{name: self_study, epochs: 1}, {name: co_study, epochs: 1}, {name: tutor, epochs: 1}]"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2, extra=(), cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra, "-m", "qkd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=cwd)


def _last(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks run (OMP_NUM_THREADS=1)
    try:
        res = qkd_in_process("run", *EQUAL, "--out", str(out), "--name", "one")
    finally:
        torch.set_num_threads(threads)
    assert res.returncode == 0, res.stderr
    return out / "one"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    res = torchrun("run", *EQUAL, "--out", str(out), "--name", "two")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.mark.torchrun
def test_two_processes_are_one_run_with_the_weights_of_one_process(two_process_run, one_process_run):
    tmp_path, res = two_process_run
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # one folder, written once
    assert res.stdout.count("run folder:") == 1 and res.stdout.count("after 3_tutor") == 1  # one table
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 100
    # The weights agree to float rounding amplified by fake quantization; the per-channel LSQ steps are compared
    # through the losses only: a step whose weights sit on rounding boundaries drifts apart (by half its size on
    # one channel of 64 after tutoring, measured 2026-12-02), as summing 2 x 50 images instead of 100 rounds. How
    # far the float weights drift depends on the CPU's kernels: under 5e-4 on an AVX2 AMD EPYC, 5.8e-4 (of weights
    # up to 0.15) on an AVX-512/AMX Xeon, hence 2e-3 here.
    one, two = _last(one_process_run), _last(tmp_path / "two")
    for model in ("student", "teacher"):
        for k, v in one[model].items():
            if "_quant." not in k:
                assert torch.allclose(v.float(), two[model][k].float(), atol=2e-3), (model, k)
    # the same images seen: every epoch's training loss agrees
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def _identical(a: dict, b: dict) -> bool:
    return all(torch.equal(a[m][k], b[m][k]) for m in ("student", "teacher") for k in a[m])


@pytest.mark.torchrun
def test_a_two_process_run_stopped_by_sigterm_resumes_bit_identical(tmp_path, two_process_run):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qkd", "run", *EQUAL,
           "--out", str(tmp_path), "--name", "two"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(_lines(metrics)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    out, err = proc.communicate(timeout=300)
    assert "Continue with: qkd run --resume" in err, err[-3000:]
    res = torchrun("run", "--resume", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _identical(_last(two_process_run[0] / "two"), _last(tmp_path / "two"))


def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.torchrun
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_run_whose_rank_was_killed_and_it_continues(tmp_path, two_process_run):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1", "-m", "qkd",
           "run", *EQUAL, "--out", str(tmp_path), "--name", "two"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(_lines(metrics)) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one rank dies; torchrun stops the other and starts both again
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "torchrun restart 1: continuing" in err
    assert _identical(_last(two_process_run[0] / "two"), _last(tmp_path / "two"))


@pytest.mark.torchrun
def test_two_torchrun_nodes_on_loopback_form_one_run(tmp_path, two_process_run):
    """Multi-node as a cluster runs it: one torchrun per node, c10d rendezvous (here both on this machine)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", "127.0.0.1:29655", "--rdzv-id", f"qkd-{os.getpid()}", "-m", "qkd", "run", *EQUAL,
           "--out", str(tmp_path), "--name", "two"]  # fmt: skip
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in "ab"]
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-3000:]
    assert sorted(out.count("run folder:") for out, _ in outs) == [0, 1]  # one table, from the node of rank 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert _identical(_last(two_process_run[0] / "two"), _last(tmp_path / "two"))


@pytest.mark.torchrun
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--out", "afile", "--name", "x"], "is a file, not a folder"),
        (["quant.wieght_bits=3"], "quant.wieght_bits: unknown key"),  # was printed by both ranks
        ([*EQUAL, "data.batch_size=101"], "data.batch_size=101 is the global batch and must be a multiple of the 2"),
    ],
    ids=["out-is-a-file", "misspelt-key", "batch-not-divisible"],
)
def test_a_bad_run_under_torchrun_is_one_line_from_rank_0(tmp_path, args, needle):
    """One line, from rank 0 alone, and no rank's traceback (the batch size gave two, 180 lines)."""
    (tmp_path / "afile").write_text("not a folder")
    res = torchrun("run", *[str(tmp_path / a) if a == "afile" else a for a in args], cwd=tmp_path)
    assert res.returncode != 0
    lines = (res.stdout + res.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("qkd: error")]
    assert len(errors) == 1 and needle in errors[0], res.stderr[-2000:]
    assert not any(ln.startswith("[rank") for ln in lines), res.stderr[-2000:]


def _fit_under_torchrun(out, stop_after=0, resume=False):
    script = Path(__file__).parent / "torchrun_fit.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(out),
           str(stop_after), str(int(resume))]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.torchrun
def test_fit_under_torchrun_with_distributed_samplers_reshuffles_counts_once_and_resumes_exactly(tmp_path):
    """The README's recipe for ``qkd.fit`` under torchrun (issue 25): each epoch a new order, every validation
    image counted once though the sampler repeats one to pad, and a stopped run resumed bit-identical."""
    _fit_under_torchrun(tmp_path / "full")
    drawn = json.loads((tmp_path / "full-drawn-rank0.json").read_text())
    orders: dict[int, list[int]] = {}
    for epoch, image in drawn:
        orders.setdefault(epoch, []).append(image)
    firsts = {tuple(images[:700]) for images in orders.values()}  # 700 images: one rank's pass
    assert len(orders) >= 5 and len(firsts) == len(orders)  # before: one sampler epoch, one order, every pass
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    for stage in summary["stages"].values():  # correct / 397: counted over 398 images, no count is whole
        assert abs(stage["val"] * 397 - round(stage["val"] * 397)) < 1e-6, stage["val"]
    assert summary["stages"]["3_tutor"]["val"] > 0.5

    _fit_under_torchrun(tmp_path / "part", stop_after=4)  # stopped in co-study, then resumed
    _fit_under_torchrun(tmp_path / "part", resume=True)
    assert _identical(_last(tmp_path / "full"), _last(tmp_path / "part"))
    resumed = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert resumed["stages"]["3_tutor"]["val"] == summary["stages"]["3_tutor"]["val"]
