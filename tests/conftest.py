"""Fixtures only: what many tests read is made once per session. Shared names live in helpers.py."""

import os

import pytest
import torch

import qkd
from helpers import DEMO, FIT_SETTINGS, TINY, digits_loaders, user_models
from qkd.config import load_config


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster when other processes compete for the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(working directory, run folder, the run's test accuracy) of one finished W2A2 digits QAT run, trained once
    and written under umask 022. Tests that write into a run (exports, resumes) take a copy (helpers.copy_run)."""
    from qkd import pipeline

    root = tmp_path_factory.mktemp("demo")
    threads, umask = torch.get_num_threads(), os.umask(0o022)
    torch.set_num_threads(1)
    try:
        run_dir, summary = pipeline.run(load_config(None, DEMO), root / "runs")
    finally:
        torch.set_num_threads(threads)
        os.umask(umask)
    return root, run_dir, summary["stages"]["1_self_study"]["test"]


@pytest.fixture(scope="session")
def full_fit(tmp_path_factory):
    """(result, the student object passed in) of the uninterrupted ``qkd.fit(**FIT_SETTINGS)`` run on a user's
    network and DataLoaders: the run that stopped and resumed twins must end bit-identical to."""
    train, val = digits_loaders()
    student, teacher = user_models()
    out = tmp_path_factory.mktemp("full") / "run"
    return qkd.fit(student, teacher, train, val, out=out, **FIT_SETTINGS), student
