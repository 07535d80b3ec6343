import os
from pathlib import Path

import pytest

from qkd.config import load_config

SHARED_DATA = Path(os.environ.get("QKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# A run small enough for unit tests: digits, a few epochs per stage.
TINY = ["epochs=4", "teacher.train_epochs=1", "student.train_epochs=1", "teacher.kwargs={width: 8}",
        "data.batch_size=128"]  # fmt: skip


@pytest.fixture
def tiny_config():
    def make(*overrides: str):
        return load_config(None, [*TINY, *overrides])

    return make


def pytest_collection_modifyitems(items):
    # Keep `-m "not slow"` meaningful: anything touching the shared CIFAR data is slow.
    for item in items:
        if "shared" in item.name:
            item.add_marker(pytest.mark.slow)
