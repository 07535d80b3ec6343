"""What a new user hit exporting and evaluating (issue 25): a bad count of images to check, a qkd.fit run folder."""

import pytest

from helpers import copy_run, qkd_in_process
from qkd.errors import QKDError
from qkd.export import export_run


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


@pytest.mark.parametrize("count", ["-5", "0"])
def test_export_refuses_a_count_to_verify_below_one(demo_run, tmp_path, count):
    """--verify -5 checked all but 5 images (355 of 360) and --verify 0 wrote the file, then failed dividing by 0:
    now one line before the run is read, nothing written."""
    run_dir = copy_run(demo_run[1], tmp_path)
    before = _files(run_dir)
    res = qkd_in_process("export", str(run_dir), "--verify", count)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (f"qkd: error: --verify is how many test images the export is checked on: 1 or more "
                          f"(e.g. 1000; a split holding fewer is checked whole), not {count}\n")  # fmt: skip
    assert _files(run_dir) == before


def test_export_run_refuses_a_count_to_verify_below_one(demo_run, tmp_path):
    with pytest.raises(QKDError, match=r"^verify is how many test images .* not -1$"):
        export_run(demo_run[1], "int", tmp_path / "m.safetensors", verify=-1)
    assert not (tmp_path / "m.safetensors").exists()
