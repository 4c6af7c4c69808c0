"""Shared fixtures: where the real datasets live, and the rule for when they are missing.

The real data (``../shared/data`` beside the checkout, or ``$FRUGALZOO_DATA``) is never copied into the project.
When it is absent, tests that need it are skipped, except under ``FRUGALZOO_REQUIRE_DATA=1`` (CI), where its
absence is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
