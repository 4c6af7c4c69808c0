"""Install bundles from a FrugalZoo index (``model_info.json``), verified and safely extracted.

Usage::

    python scripts/zoo.py list --index http://127.0.0.1:8000/model_info.json
    python scripts/zoo.py download --name endoked_polyp_segmentation \\
        --index http://127.0.0.1:8000/model_info.json --bundle_dir ./bundles_installed [--version 0.1.0]
    python scripts/zoo.py library --index http://127.0.0.1:8000/model_info.json --dest ./wheels

The index is what ``scripts/package_bundles.py`` writes: the model zoo's ``model_info.json`` format
(specs/monai_bundles.md §2.2), ``"<name>_v<version>": {"checksum": <sha1>, "sha256": <sha256>, "source": <url>}``,
where ``version`` is a semantic version; keys of another form (the library wheel ``frugalzoo-X.Y.Z-...whl``) are not
bundles. ``--index`` and each ``source`` may be ``http(s)://`` or ``file://`` URLs or local paths; a relative
``source`` is resolved against the index URL.

What ``download`` does, and how it differs from ``python -m monai.bundle download`` (§2.3):

1. picks the newest version by semantic-version precedence (``0.10.0 > 0.9.0``, ``1.0.0-rc.1 < 1.0.0``), where
   MONAI sorts version strings (``sorted(versions)[-1]`` takes ``0.9.0``);
2. downloads the archive to a temporary file and checks its sha256 (required) and sha1 (``checksum``, when present)
   before opening it; MONAI checks no hash for ``--url``;
3. refuses the archive, extracting nothing, if any member has an absolute path, a drive letter, a backslash, a
   ``..`` or empty component, is a symbolic link or other special file, is not under the top-level ``<name>/``
   folder, or repeats a name; it also requires ``<name>/configs/metadata.json`` with the indexed version;
4. extracts into a temporary folder beside ``<bundle_dir>/<name>`` and renames it into place: an existing install
   is moved aside only once the new one is complete, and removed after the swap (restored if the swap fails).

Every failure raises (``ValueError``, ``FileNotFoundError``, ``ConnectionError``) with the URL or file at fault, and
leaves ``bundle_dir`` as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import fire

TIMEOUT_S = 60.0
CHUNK = 1 << 20
SEMVER = (r"(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)"
          r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?")
# "<name>_v<semver>"; the name is greedy, so "foo_vit_v0.1.0" is bundle "foo_vit", version "0.1.0"
BUNDLE_KEY = re.compile(rf"^(?P<name>.+)_v(?P<version>{SEMVER})$")
BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WHEEL_KEY = re.compile(r"^frugalzoo-(?P<version>[^-]+)-.+\.whl$")

logger = logging.getLogger("zoo")


def semver_key(version: str) -> tuple:
    """Sort key of a semantic version, following the precedence rules of https://semver.org (§11).

    ``MAJOR.MINOR.PATCH`` compare numerically; a pre-release (``-rc.1``) sorts below its release; pre-release
    identifiers compare one by one, numeric ones numerically and below alphanumeric ones, and a shorter list of
    equal identifiers sorts first; build metadata (``+...``) is ignored.
    """
    if not re.fullmatch(SEMVER, version):
        raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD])")
    core, _, pre = version.split("+")[0].partition("-")
    major, minor, patch = (int(x) for x in core.split("."))
    if not pre:
        return major, minor, patch, 1, ()
    ids = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in pre.split("."))
    return major, minor, patch, 0, ids


def _is_url(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme in ("http", "https", "file")


def _open(location: str, timeout: float) -> Any:
    """A binary stream of ``location`` (URL or local path); network and file errors name the location."""
    try:
        if _is_url(location):
            return urllib.request.urlopen(location, timeout=timeout)  # noqa: S310 (http, https and file only)
        return open(location, "rb")
    except urllib.error.HTTPError as err:
        raise ConnectionError(f"cannot fetch {location}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, FileNotFoundError):
            raise FileNotFoundError(f"{location} not found") from err
        raise ConnectionError(f"cannot fetch {location}: {err.reason}") from err
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{location} not found") from err
    except OSError as err:  # timeouts, refused connections, unreadable files
        raise ConnectionError(f"cannot fetch {location}: {err}") from err


def read_index(index: str, timeout: float = TIMEOUT_S) -> dict[str, dict[str, str]]:
    """The JSON object at ``index`` (``http(s)://`` or ``file://`` URL, or local path)."""
    with _open(index, timeout) as f:
        try:
            data = json.loads(f.read())
        except (ValueError, OSError) as err:
            raise ValueError(f"{index}: not a JSON index ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{index}: expected a JSON object of '<name>_v<version>' entries")
    return data


def bundle_versions(index: dict[str, Any]) -> dict[str, list[str]]:
    """``{bundle name: [versions, newest first]}`` of the bundle entries of an index; other keys are skipped."""
    found: dict[str, list[str]] = {}
    for key in index:
        match = BUNDLE_KEY.match(key)
        if match:
            found.setdefault(match["name"], []).append(match["version"])
    return {name: sorted(versions, key=semver_key, reverse=True) for name, versions in sorted(found.items())}


def select_version(index: dict[str, Any], name: str, version: str | None = None, index_url: str = "the index") -> str:
    """``version`` if ``<name>_v<version>`` is in ``index``, else (``version=None``) the newest by semantic version."""
    versions = bundle_versions(index).get(name)
    if not versions:
        raise ValueError(f"bundle {name!r} is not in {index_url}; it lists {sorted(bundle_versions(index)) or 'none'}")
    if version is None:
        return versions[0]
    if version not in versions:
        raise ValueError(f"version {version} of {name!r} is not in {index_url}; available: {', '.join(versions)}")
    return version


def _source_url(entry: dict[str, Any], key: str, index_url: str) -> str:
    source = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(source, str) or not source:
        raise ValueError(f"{index_url}: entry {key} has no 'source'")
    if _is_url(source) or os.path.isabs(source):
        return source
    if _is_url(index_url):
        return urllib.parse.urljoin(index_url, source)
    return str(Path(index_url).parent / source)


def fetch_verified(url: str, entry: dict[str, Any], dest_dir: str | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to a new temporary file (in ``dest_dir``, default the system's) and check its digests.

    ``entry["sha256"]`` is required; ``entry["checksum"]`` (sha1, the model zoo's field) is checked when present.
    On any failure the temporary file is removed before the exception propagates.
    """
    sha256_expected = entry.get("sha256")
    if not sha256_expected:
        raise ValueError(f"the index entry of {url} has no 'sha256': refusing an archive that cannot be verified")
    fd, tmp = tempfile.mkstemp(prefix=".zoo-download-", suffix=".partial", dir=dest_dir)
    try:
        sha1, sha256 = hashlib.sha1(), hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open(url, timeout) as src:
            try:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    sha1.update(chunk)
                    sha256.update(chunk)
                    out.write(chunk)
            except OSError as err:
                raise ConnectionError(f"download of {url} failed: {err}") from err
        if sha256.hexdigest() != sha256_expected.lower():
            raise ValueError(f"sha256 of {url} is {sha256.hexdigest()}, the index says {sha256_expected}: "
                             "the archive is corrupt or was tampered with; nothing was installed")
        if entry.get("checksum") and sha1.hexdigest() != entry["checksum"].lower():
            raise ValueError(f"sha1 of {url} is {sha1.hexdigest()}, the index says {entry['checksum']}: "
                             "the archive is corrupt or was tampered with; nothing was installed")
    except BaseException:
        os.remove(tmp)
        raise
    return Path(tmp)


def check_members(zf: zipfile.ZipFile, name: str, where: str) -> list[zipfile.ZipInfo]:
    """The members of a bundle archive, after refusing any that could write outside ``<name>/`` or alias another.

    Raises ``ValueError`` naming the first unsafe member of ``where`` (the archive's URL).
    """
    seen: set[str] = set()
    members = zf.infolist()
    for info in members:
        member = info.filename

        def refuse(why: str, member: str = member) -> ValueError:
            return ValueError(f"unsafe archive {where}: member {member!r} {why}; nothing was extracted")

        if "\\" in member or "\x00" in member:
            raise refuse("contains a backslash or NUL")
        if member.startswith("/") or re.match(r"^[A-Za-z]:", member):
            raise refuse("has an absolute path")
        parts = member.rstrip("/").split("/") if info.is_dir() else member.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise refuse("has an empty, '.' or '..' path component")
        if parts[0] != name:
            raise refuse(f"is not under the top-level folder '{name}/'")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise refuse("is a symbolic link")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise refuse("is not a regular file or folder")
        if info.flag_bits & 0x1:
            raise refuse("is encrypted")
        key = "/".join(parts)
        if key in seen:
            raise refuse("appears twice")
        seen.add(key)
    return members


def _check_metadata(zf: zipfile.ZipFile, name: str, version: str, where: str) -> None:
    meta_name = f"{name}/configs/metadata.json"
    try:
        meta = json.loads(zf.read(meta_name))
    except KeyError as err:
        raise ValueError(f"{where} is not a bundle archive: it has no {meta_name}") from err
    except ValueError as err:
        raise ValueError(f"{where}: {meta_name} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("version") != version:
        found = meta.get("version") if isinstance(meta, dict) else None
        raise ValueError(f"{where}: {meta_name} says version {found!r}, the index says {version}")


def _extract(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], root: Path) -> int:
    """Write the checked ``members`` under ``root`` (files mode 0644); return the number of files written."""
    count = 0
    for info in members:
        target = root.joinpath(*PurePosixPath(info.filename).parts)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "xb") as dst:  # "x": never through an existing file or link
            shutil.copyfileobj(src, dst, CHUNK)
        os.chmod(target, 0o644)
        count += 1
    return count


def _swap_into_place(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``; an existing ``target`` is moved aside first and removed once it succeeded."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
        os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old.parent)


def install(name: str, index: str, bundle_dir: str, version: str | None = None,
            timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Download, verify and install bundle ``name`` from the zoo ``index`` into ``<bundle_dir>/<name>``.

    Returns ``{"name", "version", "source", "sha256", "path", "files"}`` of the installed bundle.
    """
    if not BUNDLE_NAME.match(name):
        raise ValueError(f"bundle name {name!r} must be letters, digits, '_', '.' or '-', not starting with '.'")
    catalogue = read_index(index, timeout)
    version = select_version(catalogue, name, version, index)
    key = f"{name}_v{version}"
    entry = catalogue[key]
    url = _source_url(entry, key, index)
    archive = fetch_verified(url, entry, timeout=timeout)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = check_members(zf, name, url)
            _check_metadata(zf, name, version, url)
            root = Path(bundle_dir)
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
            try:
                files = _extract(zf, members, staging)
                _swap_into_place(staging / name, root / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{url} is not a valid zip archive ({err}); nothing was extracted") from err
    finally:
        os.remove(archive)
    return {"name": name, "version": version, "source": url, "sha256": entry["sha256"],
            "path": str((root / name).resolve()), "files": files}


def download(name: str, index: str, bundle_dir: str = ".", version: str | None = None,
             timeout: float = TIMEOUT_S) -> None:
    """Install bundle ``name`` (newest version unless ``version`` is given) from ``index`` into ``bundle_dir``.

    Args:
        name: bundle name, the ``<name>`` of the index keys ``<name>_v<version>``.
        index: ``http(s)://`` or ``file://`` URL, or local path, of the zoo's ``model_info.json``.
        bundle_dir: folder to install into; the bundle ends up in ``<bundle_dir>/<name>``.
        version: exact version to install (default: the newest by semantic-version precedence).
        timeout: seconds to wait on each network operation.
    """
    done = install(name, index, bundle_dir, None if version is None else str(version), timeout)
    print(f"installed {done['name']} {done['version']} ({done['files']} files) into {done['path']}\n"
          f"  from {done['source']}\n  sha256 {done['sha256']} (verified)")


def list_bundles(index: str, timeout: float = TIMEOUT_S) -> None:
    """Print each bundle of ``index`` with its versions, newest first, and the library wheels it holds."""
    catalogue = read_index(index, timeout)
    for name, versions in bundle_versions(catalogue).items():
        print(f"{name}: {', '.join(versions)}")
    for key in sorted(k for k in catalogue if WHEEL_KEY.match(k)):
        print(f"library wheel: {key}")


def library(index: str, dest: str = ".", version: str | None = None, timeout: float = TIMEOUT_S) -> None:
    """Download and verify the ``frugalzoo`` wheel (the ``common`` library the bundles import) into ``dest``.

    Args:
        index: URL or path of the zoo's ``model_info.json``.
        dest: folder for the wheel.
        version: library version (default: the newest in the index); a bundle names the one it was built with in
            ``required_packages_version["frugalzoo"]`` of its ``configs/metadata.json``.
        timeout: seconds to wait on each network operation.
    """
    catalogue = read_index(index, timeout)
    wheels = {m["version"]: key for key in catalogue if (m := WHEEL_KEY.match(key))}
    if not wheels:
        raise ValueError(f"{index} lists no frugalzoo wheel")
    chosen = str(version) if version is not None else max(wheels, key=semver_key)
    if chosen not in wheels:
        raise ValueError(f"frugalzoo {chosen} is not in {index}; available: {', '.join(sorted(wheels))}")
    key = wheels[chosen]
    url = _source_url(catalogue[key], key, index)
    Path(dest).mkdir(parents=True, exist_ok=True)
    tmp = fetch_verified(url, catalogue[key], dest_dir=dest, timeout=timeout)
    os.replace(tmp, Path(dest) / key)
    print(f"verified {Path(dest) / key}\n  install it with: pip install {Path(dest) / key}")


if __name__ == "__main__":
    fire.Fire({"download": download, "list": list_bundles, "library": library})
