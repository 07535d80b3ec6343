"""scripts/fault_injection.py: runs killed with SIGKILL and resumed end bit-identical to an uninterrupted one."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.cli  # real processes killed with SIGKILL
def test_killed_and_resumed_runs_are_bit_identical(tmp_path):
    fault_injection = load_script()
    # every kind of kill in two trials: at a random moment and again on resume; at a checkpoint write
    assert [fault_injection.plan(i) for i in (1, 2)] == [["time", "time"], ["write"]]
    report_path = tmp_path / "trials.json"
    # the two trials side by side (one thread each, two cores): their processes are real and killed for real
    argv = ["--first", "1", "--trials", "2", "--seed", "0", "--jobs", "2", "--out", str(tmp_path), "--json",
            str(report_path)]  # fmt: skip
    rc = fault_injection.main(argv)
    trials = json.loads(report_path.read_text())["trials"]
    assert [t["trial"] for t in trials] == [1, 2]
    assert [t["error"] for t in trials] == ["", ""]
    assert [t["identical"] for t in trials] == [True, True]
    assert rc == 0
