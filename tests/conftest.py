"""Shared fixtures: where the real datasets live, and the rule for when they are missing.

The real data (``../shared/data`` beside the checkout, or ``$FRUGALZOO_DATA``) is never copied into the project.
When it is absent, tests that need it are skipped, except under ``FRUGALZOO_REQUIRE_DATA=1`` (CI), where its
absence is a failure.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from types import ModuleType
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$FRUGALZOO_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("FRUGALZOO_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_data(subdir: str) -> Path:
    """Path of ``<data root>/<subdir>``; skip (or fail under ``FRUGALZOO_REQUIRE_DATA=1``) when it is absent."""
    path = data_root() / subdir
    if not path.is_dir():
        message = f"real data folder {path} not found (set FRUGALZOO_DATA to the folder holding '{subdir}')"
        if os.environ.get("FRUGALZOO_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def polyp_data() -> Path:
    """The real polyp sets (Kvasir, CVC-ClinicDB, EndoScene, Kvasir-Sessile) in the flat ``<Set>/images|masks`` layout."""
    return require_data("polyp")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module: tiny tensors and tiny 3D convolutions run fastest (and steadiest
    on a shared 2-core machine) without thread hand-offs. Use with ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bundle_workflow(configs_dir: Path, bundle_root: Path, kind: str | None, configs: list[str],
                    **override) -> ConfigWorkflow:
    """``ConfigWorkflow`` of ``configs`` (file names in ``configs_dir``) with ``bundle_root`` and top-level id
    ``override``s, initialised, with every required property of ``kind`` present."""
    wf = ConfigWorkflow(
        config_file=[str(configs_dir / c) for c in configs], meta_file=str(configs_dir / "metadata.json"),
        logging_file=False, workflow_type=kind, bundle_root=str(bundle_root), **override,
    )
    wf.initialize()
    assert wf.check_properties() == []
    return wf


def run_workflow(wf: ConfigWorkflow):
    """Run an initialised workflow and finalise it; returns what ``run`` returns."""
    result = wf.run()
    wf.finalize()
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def error_text(err: BaseException | None) -> str:
    """The message of an error and of everything it was raised from (MONAI wraps config-evaluation errors)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
