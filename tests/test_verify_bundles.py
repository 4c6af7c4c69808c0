"""scripts/verify_bundles.py (the model-zoo checks) and ../shared/tools/bundle_lint.py on every bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, data_root

pytestmark = pytest.mark.slow


def _schema() -> str:
    path = data_root().parent / "schemas" / "meta_schema_20240725.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return str(path)


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "verify_bundles.py"), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=1500)


def test_every_bundle_passes_the_zoo_checks():
    result = verify("--schema", _schema())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for check in ("files", "version", "metadata schema", "verify_net_in_out", "ckpt_export + reload",
                  "check_properties"):
        assert f"endoked_polyp_segmentation: {check}: ok" in result.stdout
    networks = sorted((REPO_ROOT / "bundles" / "endoked_polyp_segmentation" / "configs" / "networks").glob("*.json"))
    assert len(networks) >= 2  # the baselines as overrides (UNet, UNet++, ...)
    for network in networks:  # every baseline override is checked like the bundle's own network
        for check in ("verify_net_in_out", "ckpt_export + reload"):
            assert f"endoked_polyp_segmentation[{network.stem}]: {check}: ok" in result.stdout


def test_a_broken_bundle_fails_with_a_clear_list(tmp_path):
    bundle = tmp_path / "bundles" / "broken_bundle"
    shutil.copytree(REPO_ROOT / "bundles" / "endoked_polyp_segmentation" / "configs", bundle / "configs")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"  # not in the changelog
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 2  # the network has 1 output channel
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    result = verify("--schema", _schema(), "--bundles_dir", str(tmp_path / "bundles"))
    assert result.returncode == 1
    assert "broken_bundle: files: FileNotFoundError: missing LICENSE" in result.stderr
    assert "broken_bundle: version: ValueError: version 9.9.9 is not in the changelog" in result.stderr
    assert "broken_bundle: verify_net_in_out: ValueError: output channel number" in result.stderr


def test_bundle_lint_deep(tmp_path):
    lint = data_root().parent / "tools" / "bundle_lint.py"
    if not lint.is_file():
        pytest.skip(f"{lint} not found")
    # --deep builds each workflow with bundle_root "." (the zoo default): run it where it may write its demo data
    result = subprocess.run([sys.executable, str(lint), "--deep", str(REPO_ROOT / "bundles")], capture_output=True,
                            text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    n_bundles = len([p for p in (REPO_ROOT / "bundles").iterdir() if p.is_dir()])
    assert result.stdout.strip().endswith(f"{n_bundles} of {n_bundles} bundles pass")
