"""Training killed with SIGKILL and restarted with ``--resume true`` ends with the weights of an uninterrupted run.

Each bundle runs as users run it, ``python -m monai.bundle run`` in a subprocess, with a tiny deterministic CPU
configuration given on the command line: once uninterrupted (root A), once killed while its second epoch is under
way (after ``training_state_epoch=1.pt`` is written) and restarted with ``--resume true`` (root B). For the 3D
bundle a third run is killed before any checkpoint exists and resumed (it starts afresh). The demo data generated
in root A is copied to the other roots so that every run reads the same files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.handlers.training_state import latest_training_state
from common.utils.checkpoints import read_state_dict

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

EPOCHS = 3
# 2D: PVTv2-b0 Polyp-PVT at 64 px; 3D: the demo volumes with 4-filter VNets and 40 % labelled (5 labelled cases,
# so the order of the labelled sampler matters)
TINY = {
    "endoked_polyp_segmentation": ["--backbone", "pvt_v2_b0", "--image_size", "64", "--batch_size", "4"],
    "dhc_abdomen_ct_segmentation": ["--n_filters", "4", "--labelled_percent", "40"],
}
COMMON = ["--epochs", str(EPOCHS), "--num_workers", "0", "--progress_bar", "False"]
TIMEOUT = 300


def _command(bundle: str, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
            "--bundle_root", str(root), *COMMON, *TINY[bundle], *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(bundle: str, root: Path, *extra: str) -> None:
    """Run the training to completion; fail with the end of its output otherwise."""
    done = subprocess.run(_command(bundle, root, *extra), cwd=REPO_ROOT / "bundles" / bundle, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:]


def _kill_when(bundle: str, root: Path, marker: str) -> None:
    """Start the training, SIGKILL it as soon as a line of its output contains ``marker``."""
    proc = subprocess.Popen(_command(bundle, root), cwd=REPO_ROOT / "bundles" / bundle, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + TIMEOUT
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line or time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, f"run ended by itself before the kill:\n{''.join(seen[-30:])}"
    assert any(marker in line for line in seen), f"never saw {marker!r}:\n{''.join(seen[-30:])}"


def _with_data_of(source: Path, root: Path) -> Path:
    shutil.copytree(source / "data", root / "data")
    return root


def _assert_same_final_weights(a: Path, b: Path) -> None:
    final_state = f"training_state_epoch={EPOCHS}.pt"
    assert latest_training_state(a / "models").name == latest_training_state(b / "models").name == final_state
    state_a = torch.load(a / "models" / final_state, weights_only=True)
    state_b = torch.load(b / "models" / final_state, weights_only=True)
    assert state_a["trainer"]["iteration"] == state_b["trainer"]["iteration"]
    for key in state_a["model"]:
        assert torch.equal(state_a["model"][key], state_b["model"][key]), f"{b}: {key} differs from the run in {a}"
    best_a, best_b = read_state_dict(a / "models" / "model.pt"), read_state_dict(b / "models" / "model.pt")
    assert best_a.keys() == best_b.keys() and best_a.keys() <= state_a["model"].keys()
    for key in best_a:
        assert torch.equal(best_a[key], best_b[key]), f"{b}: model.pt {key} differs from the uninterrupted run"
    assert state_a["checkpoint_saver"] == state_b["checkpoint_saver"]  # the same best score


@pytest.mark.parametrize("bundle", list(TINY))
def test_killed_training_resumes_to_the_same_weights(bundle, tmp_path):
    uninterrupted, killed = tmp_path / "a", tmp_path / "b"
    _train(bundle, uninterrupted)

    # "Epoch[1] Complete" is logged after epoch 1's training state is written, just before epoch 2 starts
    _kill_when(bundle, _with_data_of(uninterrupted, killed), "Trainer - INFO - Epoch[1] Complete")
    left = latest_training_state(killed / "models")  # epoch 1's, or epoch 2's on a very slow machine
    assert left is not None and left.name != f"training_state_epoch={EPOCHS}.pt"
    _train(bundle, killed, "--resume", "true")
    _assert_same_final_weights(uninterrupted, killed)

    if bundle == "dhc_abdomen_ct_segmentation":  # a kill before any checkpoint: the resumed run starts afresh
        early = _with_data_of(uninterrupted, tmp_path / "c")
        _kill_when(bundle, early, "Trainer - INFO - Engine run resuming from iteration 0")
        assert latest_training_state(early / "models") is None
        _train(bundle, early, "--resume", "true")
        _assert_same_final_weights(uninterrupted, early)
