"""Package the bundles as reproducible zoo archives, build the ``common`` wheel and write the zoo index.

Usage::

    python scripts/package_bundles.py                                  # every bundle, into dist/zoo
    python scripts/package_bundles.py --bundles endoked_polyp_segmentation --out dist/zoo
    python scripts/package_bundles.py --include_weights                # also ship models/model.pt when present
    python scripts/package_bundles.py --base_url https://example.org/zoo --wheel False

What it writes (specs/monai_bundles.md §2.2, the model zoo's ``ci/update_model_info.py``):

1. ``<out>/<name>_v<version>.zip`` per bundle, ``version`` from ``configs/metadata.json``. The archive has one
   top-level ``<name>/`` folder, as ``python -m monai.bundle download --url`` expects, and holds only what the bundle
   needs: ``LICENSE``, ``large_files.{yml,yaml,json}``, ``configs/**``, ``docs/**``, ``scripts/**``
   (without ``__pycache__``, ``*.pyc`` and hidden files); ``models/model.pt`` only with ``--include_weights``.
   Runtime products (``eval/``, ``data/``, ``runs/``, other checkpoints) are never packaged.
   It is byte-identical on rebuild: entries sorted by name, no directory entries (``zip -D``), every timestamp
   2022-05-30 00:00 (the zoo's ``touch -t 202205300000``), mode 0644, Unix "made by", deflate level 9, no extras.
2. ``<out>/frugalzoo-<version>-py3-none-any.whl``, the shared library, built with
   ``pip wheel --no-deps --no-build-isolation`` from a clean copy of the project's packaging files and ``common/``
   (no stale ``build/`` folder), with ``SOURCE_DATE_EPOCH`` set so that it is reproducible as well.
   ``--wheel False`` skips it.
3. ``<out>/model_info.json``, merged with the existing one so that it can list several versions of a bundle.
   Bundle entries keep the zoo format, ``"<name>_v<version>": {"checksum": <sha1>, "sha256": <sha256>,
   "source": <base_url>/<zip>}``; the wheel has an entry of the same shape keyed by its file name
   (``frugalzoo-0.1.0-py3-none-any.whl``), which ``scripts/zoo.py`` does not take for a bundle.
   ``--base_url`` defaults to the ``file://`` URL of ``<out>``; serve ``<out>`` over HTTP and pass its URL instead
   to publish the zoo (see ``scripts/zoo.py``). ``--base_url .`` writes sources relative to the index, which
   ``scripts/zoo.py`` resolves against the index's URL (``monai.bundle`` and the model zoo's tools do not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]
ZIP_DATE_TIME = (2022, 5, 30, 0, 0, 0)  # the model zoo's `touch -t 202205300000`
WHEEL_EPOCH = "315532800"  # 1980-01-01 00:00 UTC, the earliest time a zip entry can hold
FILE_MODE = 0o100644  # regular file, rw-r--r--
BUNDLE_FILES = ("LICENSE", "large_files.yml", "large_files.yaml", "large_files.json")
BUNDLE_FOLDERS = ("configs", "docs", "scripts")
WEIGHTS = "models/model.pt"
WHEEL_SOURCES = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
LIBRARY = "common"
INDEX_NAME = "model_info.json"
# https://semver.org/#is-there-a-suggested-regular-expression-regex-to-check-a-semver-string, simplified
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
                    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$")

logger = logging.getLogger("package_bundles")


def file_digests(path: Path) -> tuple[str, str]:
    """``(sha1, sha256)`` hex digests of ``path``, read in 1 MiB chunks."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def bundle_version(bundle: Path) -> str:
    """The ``version`` of ``<bundle>/configs/metadata.json``; it must be a semantic version (``X.Y.Z[-pre]``)."""
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: {bundle} is not a bundle")
    version = json.loads(meta_file.read_text()).get("version")
    if not isinstance(version, str) or not SEMVER.match(version):
        raise ValueError(f"{meta_file}: 'version' must be a semantic version like 0.1.0, got {version!r}")
    return version


def _walk(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link: bundles are packaged from regular files only")
        if path.is_file():
            yield path


def bundle_members(bundle: Path, include_weights: bool = False) -> list[tuple[str, Path]]:
    """``(archive name, source file)`` of every file packaged from ``bundle``, sorted by archive name.

    Archive names are ``<bundle name>/<path relative to the bundle>`` with ``/`` separators.
    """
    files = [bundle / name for name in BUNDLE_FILES if (bundle / name).is_file()]
    if include_weights and (bundle / WEIGHTS).is_file():
        files.append(bundle / WEIGHTS)
    for path in files:
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link: bundles are packaged from regular files only")
    for folder in BUNDLE_FOLDERS:
        if (bundle / folder).is_dir():
            files.extend(_walk(bundle / folder))
    return sorted((f"{bundle.name}/{path.relative_to(bundle).as_posix()}", path) for path in files)


def build_bundle_zip(bundle: Path, out: Path, include_weights: bool = False) -> Path:
    """Write ``<out>/<name>_v<version>.zip`` reproducibly (see the module docstring) and return its path.

    The archive is written beside its final path and renamed into place, so a failed build leaves no partial zip.
    """
    bundle = Path(bundle)
    version = bundle_version(bundle)
    members = bundle_members(bundle, include_weights)
    if not any(name == f"{bundle.name}/configs/metadata.json" for name, _ in members):
        raise ValueError(f"{bundle}: configs/metadata.json would not be packaged")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{bundle.name}_v{version}.zip"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=out)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name, path in members:
                info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # Unix, whatever the building platform
                info.external_attr = FILE_MODE << 16
                info.file_size = path.stat().st_size  # lets zipfile decide on zip64 before streaming
                zip64 = info.file_size > zipfile.ZIP64_LIMIT
                with open(path, "rb") as src, zf.open(info, "w", force_zip64=zip64) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("%s: %d files -> %s", bundle.name, len(members), target)
    return target


def build_wheel(out: Path, repo: Path = REPO_ROOT) -> Path:
    """Build the ``frugalzoo`` wheel of ``<repo>/common`` into ``out`` and return its path.

    The packaging files and the ``common`` package (without ``__pycache__``) are copied to a temporary folder
    first, so no stale ``build/`` tree of the checkout leaks into the wheel and the checkout is left untouched.
    Needs ``setuptools>=64`` in the running interpreter (``--no-build-isolation``: no network access).
    """
    if not (repo / LIBRARY / "__init__.py").is_file():
        raise FileNotFoundError(f"{repo / LIBRARY / '__init__.py'} not found: {repo} is not the project root")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, wheel_dir = Path(tmp) / "src", Path(tmp) / "wheel"
        src.mkdir()
        for name in WHEEL_SOURCES:
            if (repo / name).is_file():
                shutil.copy2(repo / name, src / name)
        shutil.copytree(repo / LIBRARY, src / LIBRARY, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
               "-w", str(wheel_dir), str(src)]
        env = {**os.environ, "SOURCE_DATE_EPOCH": WHEEL_EPOCH}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        target = out / wheels[0].name
        shutil.copyfile(wheels[0], target)
    logger.info("library wheel -> %s", target)
    return target


def index_entry(path: Path, base_url: str) -> dict[str, str]:
    """The zoo index entry of an archive: ``{"checksum": sha1, "sha256": sha256, "source": <base_url>/<name>}``."""
    sha1, sha256 = file_digests(path)
    return {"checksum": sha1, "sha256": sha256, "source": f"{base_url.rstrip('/')}/{path.name}"}


def update_index(index_file: Path, entries: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Merge ``entries`` into the JSON index ``index_file`` (created if absent), write it atomically, return it.

    Entries of other keys (other bundles, other versions) are kept; an entry whose key is rebuilt is replaced, with
    a warning when its archive changed.
    """
    index: dict[str, dict[str, str]] = {}
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            raise ValueError(f"{index_file}: expected a JSON object of '<name>_v<version>' entries")
    for key, entry in entries.items():
        old = index.get(key)
        if old and old.get("sha256") not in (None, entry["sha256"]):
            logger.warning("%s: replacing %s (the archive changed but its version did not)", index_file, key)
        index[key] = entry
    tmp = index_file.with_name(f".{index_file.name}.partial")
    tmp.write_text(json.dumps(index, indent=4, sort_keys=True) + "\n")
    os.replace(tmp, index_file)
    return index


def package(bundles: str | list[str] | None = None, out: str | None = None, base_url: str | None = None,
            include_weights: bool = False, wheel: bool = True, bundles_dir: str | None = None) -> None:
    """Build the archives of the named bundles (default: all under ``bundles/``), the wheel, and the index.

    Args:
        bundles: bundle names (folder names under ``bundles_dir``), comma-separated or a list.
        out: output folder (default: ``<repo>/dist/zoo``); ``<out>/model_info.json`` is merged, not overwritten.
        base_url: URL the folder will be served from; ``source`` of each entry is ``<base_url>/<file name>``
            (default: the ``file://`` URL of ``out``).
        include_weights: also package ``models/model.pt`` of each bundle that has one.
        wheel: also build the ``frugalzoo`` wheel of the shared library and index it.
        bundles_dir: folder holding the bundles (default: ``<repo>/bundles``).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(bundles_dir) if bundles_dir else REPO_ROOT / "bundles"
    names = bundles.split(",") if isinstance(bundles, str) else bundles
    folders = [root / n for n in names] if names else sorted(p for p in root.iterdir() if (p / "configs").is_dir())
    if not folders:
        raise ValueError(f"no bundle found under {root}")
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"no such bundle folder {folder}")
    out_dir = Path(out) if out else REPO_ROOT / "dist" / "zoo"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = base_url or out_dir.resolve().as_uri()
    entries = {}
    for folder in folders:
        archive = build_bundle_zip(folder, out_dir, include_weights)
        entries[archive.stem] = index_entry(archive, base)
        print(f"{archive.name}: sha256 {entries[archive.stem]['sha256']}")
    if wheel:
        wheel_file = build_wheel(out_dir)
        entries[wheel_file.name] = index_entry(wheel_file, base)
        print(f"{wheel_file.name}: sha256 {entries[wheel_file.name]['sha256']}")
    update_index(out_dir / INDEX_NAME, entries)
    print(f"index: {out_dir / INDEX_NAME} ({len(entries)} entries written, source {base})")


if __name__ == "__main__":
    fire.Fire(package)
