"""scripts/package_bundles.py (reproducible archives, wheel, merged index) and scripts/zoo.py (safe downloader).

The zoo is served over HTTP on 127.0.0.1 by a ``ThreadingHTTPServer`` started in the test; nothing leaves the
loopback interface. Bundles are packaged from a copy of ``bundles/endoked_polyp_segmentation`` in ``tmp_path``
(the real bundle is never written to), with runtime products added to check that they are left out.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

import common
from conftest import REPO_ROOT, load_script

pytestmark = pytest.mark.slow

BUNDLE = "endoked_polyp_segmentation"
VERSION = json.loads((REPO_ROOT / "bundles" / BUNDLE / "configs" / "metadata.json").read_text())["version"]


package_bundles = load_script("package_bundles")
zoo = load_script("zoo")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its content (``None`` for folders); ``{}`` when it does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def set_version(bundle: Path, version: str) -> None:
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = version
    meta["changelog"][version] = "test release"
    meta_file.write_text(json.dumps(meta, indent=4))


@pytest.fixture
def bundles_dir(tmp_path: Path) -> Path:
    """``<tmp>/bundles/<BUNDLE>``: the tracked files of the real bundle, plus runtime products to be left out."""
    source, bundle = REPO_ROOT / "bundles" / BUNDLE, tmp_path / "bundles" / BUNDLE
    shutil.copytree(source / "configs", bundle / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(source / "docs", bundle / "docs")
    shutil.copy(source / "LICENSE", bundle / "LICENSE")
    for junk in ("eval/metrics_per_set.csv", "data/demo/TestDataset/images/0000.jpg", "runs/events.out",
                 "models/training_state_epoch=1.pt", "models/model.pt", "configs/__pycache__/x.cpython-311.pyc",
                 "docs/.README.md.swp"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_bytes(b"runtime product")
    return tmp_path / "bundles"


@pytest.fixture
def http_zoo(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``(folder, base URL)`` of a folder served over HTTP on 127.0.0.1 (a free port) for the test's duration."""
    folder = tmp_path / "zoo"
    folder.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def package(bundles_dir: Path, out: Path, **kwargs) -> dict:
    package_bundles.package(bundles=BUNDLE, out=str(out), bundles_dir=str(bundles_dir), **kwargs)
    return json.loads((out / "model_info.json").read_text())


def test_rebuild_is_byte_identical(bundles_dir, tmp_path):
    first = package(bundles_dir, tmp_path / "a")
    for path in (bundles_dir / BUNDLE).rglob("*"):  # a later checkout: other mtimes and permissions
        path.touch()
        if path.is_file():
            path.chmod(0o600)
    second = package(bundles_dir, tmp_path / "b")
    zip_name, wheel_name = f"{BUNDLE}_v{VERSION}.zip", f"frugalzoo-{common.__version__}-py3-none-any.whl"
    for name in (zip_name, wheel_name):
        assert sha256(tmp_path / "a" / name) == sha256(tmp_path / "b" / name)
    key = f"{BUNDLE}_v{VERSION}"
    assert first[key]["sha256"] == second[key]["sha256"] == sha256(tmp_path / "a" / zip_name)
    with zipfile.ZipFile(tmp_path / "b" / zip_name) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    for info in infos:
        assert info.date_time == (2022, 5, 30, 0, 0, 0)  # the zoo's `touch -t 202205300000`
        assert info.external_attr >> 16 == 0o100644  # regular file, rw-r--r--, though the sources are 0600 now
        assert info.compress_type == zipfile.ZIP_DEFLATED


def test_archive_holds_only_what_the_bundle_needs(bundles_dir, tmp_path):
    package(bundles_dir, tmp_path / "plain", wheel=False)
    with zipfile.ZipFile(tmp_path / "plain" / f"{BUNDLE}_v{VERSION}.zip") as zf:
        names = set(zf.namelist())
    source = bundles_dir / BUNDLE
    expected = {f"{BUNDLE}/LICENSE"} | {
        f"{BUNDLE}/{p.relative_to(source).as_posix()}" for folder in ("configs", "docs")
        for p in (source / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        and not p.name.startswith(".")}
    assert names == expected
    assert f"{BUNDLE}/configs/metadata.json" in names and f"{BUNDLE}/configs/inference.json" in names
    assert not [n for n in names if n.split("/")[1] in ("eval", "data", "runs", "models") or n.endswith(".pyc")]

    package(bundles_dir, tmp_path / "weights", wheel=False, include_weights=True)
    with zipfile.ZipFile(tmp_path / "weights" / f"{BUNDLE}_v{VERSION}.zip") as zf:
        assert set(zf.namelist()) == expected | {f"{BUNDLE}/models/model.pt"}  # not training_state_*.pt
        assert zf.read(f"{BUNDLE}/models/model.pt") == b"runtime product"


def test_index_merges_versions_in_zoo_format(bundles_dir, tmp_path):
    out = tmp_path / "zoo"
    set_version(bundles_dir / BUNDLE, "0.9.0")
    package(bundles_dir, out, wheel=False, base_url="https://example.org/zoo/")
    set_version(bundles_dir / BUNDLE, "0.10.0")
    index = package(bundles_dir, out, base_url="https://example.org/zoo")
    wheel = f"frugalzoo-{common.__version__}-py3-none-any.whl"
    assert set(index) == {f"{BUNDLE}_v0.9.0", f"{BUNDLE}_v0.10.0", wheel}
    for key, file_name in ((f"{BUNDLE}_v0.9.0", f"{BUNDLE}_v0.9.0.zip"), (f"{BUNDLE}_v0.10.0", f"{BUNDLE}_v0.10.0.zip"),
                           (wheel, wheel)):
        data = (out / file_name).read_bytes()
        assert index[key] == {"checksum": hashlib.sha1(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest(),
                              "source": f"https://example.org/zoo/{file_name}"}
    with zipfile.ZipFile(out / wheel) as zf:
        assert "common/__init__.py" in zf.namelist() and "common/networks/polyp_pvt.py" in zf.namelist()
    assert zoo.bundle_versions(index) == {BUNDLE: ["0.10.0", "0.9.0"]}  # the wheel's key is not a bundle


def test_semantic_version_order():
    # the precedence example of https://semver.org §11, shuffled; string order would put 0.10.0 before 0.9.0
    ordered = ["0.9.0", "0.10.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
               "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0"]
    assert sorted(reversed(ordered), key=zoo.semver_key) == ordered
    assert zoo.semver_key("1.0.0+build.5") == zoo.semver_key("1.0.0")  # build metadata has no precedence
    index = {f"{BUNDLE}_v0.9.0": {}, f"{BUNDLE}_v0.10.0": {}, f"{BUNDLE}_v0.10.1-rc.1": {}, f"{BUNDLE}_v0.2.0": {},
             "frugalzoo-0.1.0-py3-none-any.whl": {}, "other_v1.0.0": {}}
    assert zoo.select_version(index, BUNDLE) == "0.10.1-rc.1"  # 0.10.1-rc.1 > 0.10.0 > 0.9.0 > 0.2.0
    del index[f"{BUNDLE}_v0.10.1-rc.1"]
    assert zoo.select_version(index, BUNDLE) == "0.10.0"
    assert zoo.select_version(index, BUNDLE, "0.9.0") == "0.9.0"
    with pytest.raises(ValueError, match="version 0.3.0 of 'endoked_polyp_segmentation' is not in idx.json"):
        zoo.select_version(index, BUNDLE, "0.3.0", "idx.json")
    with pytest.raises(ValueError, match="'spleen' is not in idx.json"):
        zoo.select_version(index, "spleen", None, "idx.json")
    with pytest.raises(ValueError, match="not a semantic version"):
        zoo.semver_key("0.1")


def test_download_over_http_installs_the_newest_then_a_chosen_version(bundles_dir, http_zoo, tmp_path, capsys):
    folder, url = http_zoo
    for version, base_url in (("0.9.0", "."), ("0.10.0", url)):  # ".": a source relative to the index's URL
        set_version(bundles_dir / BUNDLE, version)
        package(bundles_dir, folder, wheel=False, base_url=base_url)
    target = tmp_path / "installed"
    zoo.download(name=BUNDLE, index=f"{url}/model_info.json", bundle_dir=str(target))
    with zipfile.ZipFile(folder / f"{BUNDLE}_v0.10.0.zip") as zf:
        expected = {n[len(BUNDLE) + 1:]: zf.read(n) for n in zf.namelist()}
    assert f"installed {BUNDLE} 0.10.0 ({len(expected)} files) into {target / BUNDLE}" in capsys.readouterr().out
    installed = {k: v for k, v in snapshot(target / BUNDLE).items() if v is not None}
    assert installed == expected
    assert [p.name for p in target.iterdir()] == [BUNDLE]  # no temporary folder left beside it

    done = zoo.install(BUNDLE, f"{url}/model_info.json", str(target), version="0.9.0")  # replaces 0.10.0
    assert done["version"] == "0.9.0" and done["source"] == f"{url}/{BUNDLE}_v0.9.0.zip"
    assert json.loads((target / BUNDLE / "configs" / "metadata.json").read_text())["version"] == "0.9.0"
    assert [p.name for p in target.iterdir()] == [BUNDLE]


def test_tampered_archive_is_rejected_and_nothing_changes(bundles_dir, http_zoo, tmp_path, monkeypatch):
    folder, url = http_zoo
    package(bundles_dir, folder, wheel=False, base_url=url)
    target = tmp_path / "installed"
    zoo.install(BUNDLE, f"{url}/model_info.json", str(target))
    before = snapshot(target)
    archive = folder / f"{BUNDLE}_v{VERSION}.zip"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    archive.write_bytes(bytes(data))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(ValueError, match=f"sha256 of {url}/{BUNDLE}_v{VERSION}.zip is {hashlib.sha256(data).hexdigest()}"):
        zoo.install(BUNDLE, f"{url}/model_info.json", str(target))
    assert snapshot(target) == before
    assert list(temp.iterdir()) == []  # the downloaded file was removed
    with pytest.raises(ValueError, match="sha256"):
        zoo.install(BUNDLE, f"{url}/model_info.json", str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()


def _write_bundle_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> dict[str, str]:
    meta = json.dumps({"version": "0.1.0"}).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name" is the point of one case
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{BUNDLE}/configs/metadata.json", meta)
            for name, data in members:
                zf.writestr(name, data)
    data = path.read_bytes()
    return {"checksum": hashlib.sha1(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest(),
            "source": path.name}  # relative: resolved against the index's location


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16  # S_IFLNK; the content is the link target
    return info


@pytest.mark.parametrize("member, why", [
    ("../evil.txt", "has an empty, '.' or '..' path component"),
    ("{tmp}/abs_evil.txt", "has an absolute path"),
    (f"{BUNDLE}/../../evil.txt", "has an empty, '.' or '..' path component"),
    ("C:/evil.txt", "has an absolute path"),
    ("other_bundle/evil.txt", f"is not under the top-level folder '{BUNDLE}/'"),
    (f"{BUNDLE}/configs/metadata.json", "appears twice"),
    ("symlink", "is a symbolic link"),
])
def test_unsafe_archive_is_rejected_before_extracting(tmp_path, member, why):
    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    name = member.replace("{tmp}", str(tmp_path))
    entry = _write_bundle_zip(zoo_dir / f"{BUNDLE}_v{VERSION}.zip", [
        (f"{BUNDLE}/LICENSE", b"ok"),
        (_symlink(f"{BUNDLE}/evil.txt") if member == "symlink" else name, b"../../evil.txt"),
    ])
    (zoo_dir / "model_info.json").write_text(json.dumps({f"{BUNDLE}_v{VERSION}": entry}))
    target = tmp_path / "installed"
    shown = f"{BUNDLE}/evil.txt" if member == "symlink" else name
    with pytest.raises(ValueError, match=f"unsafe archive .*member {re.escape(repr(shown))} {re.escape(why)}"):
        zoo.install(BUNDLE, str(zoo_dir / "model_info.json"), str(target))
    assert not target.exists()  # not even created
    assert not list(tmp_path.parent.glob("evil.txt")) and not [p for p in tmp_path.rglob("*evil.txt")]


def test_clear_errors_name_the_url(bundles_dir, http_zoo, tmp_path):
    folder, url = http_zoo
    package(bundles_dir, folder, wheel=False, base_url=url)
    index_url = f"{url}/model_info.json"
    with pytest.raises(ValueError, match=f"bundle 'spleen' is not in {index_url}"):
        zoo.install("spleen", index_url, str(tmp_path / "x"))
    with pytest.raises(ValueError, match=f"version 9.9.9 of '{BUNDLE}' is not in {index_url}; available: {VERSION}"):
        zoo.install(BUNDLE, index_url, str(tmp_path / "x"), version="9.9.9")
    (folder / f"{BUNDLE}_v{VERSION}.zip").unlink()
    with pytest.raises(ConnectionError, match=f"cannot fetch {url}/{BUNDLE}_v{VERSION}.zip: HTTP 404"):
        zoo.install(BUNDLE, index_url, str(tmp_path / "x"))
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/model_info.json"
    with pytest.raises(ConnectionError, match=f"cannot fetch {closed}"):
        zoo.install(BUNDLE, closed, str(tmp_path / "x"), timeout=5)
    with pytest.raises(FileNotFoundError, match="nowhere/model_info.json not found"):
        zoo.read_index(str(tmp_path / "nowhere" / "model_info.json"))
    index = json.loads((folder / "model_info.json").read_text())
    del index[f"{BUNDLE}_v{VERSION}"]["sha256"]
    (folder / "model_info.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no 'sha256'"):
        zoo.install(BUNDLE, index_url, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_monai_bundle_download_accepts_our_archive(bundles_dir, http_zoo, tmp_path):
    from monai.bundle import download

    folder, url = http_zoo
    package(bundles_dir, folder, wheel=False, base_url=url)
    with pytest.warns(UserWarning, match="file integrity is NOT verified"):  # MONAI checks no hash for --url
        download(name=BUNDLE, url=f"{url}/{BUNDLE}_v{VERSION}.zip", bundle_dir=str(tmp_path / "monai"), progress=False)
    installed = tmp_path / "monai" / BUNDLE / "configs" / "metadata.json"
    assert installed.read_bytes() == (bundles_dir / BUNDLE / "configs" / "metadata.json").read_bytes()


def test_done_when_packaged_served_downloaded_loaded_and_served_by_monai_label(
    bundles_dir, http_zoo, tmp_path, monkeypatch
):
    """The issue's "Done when", in one test: package here, serve on loopback, install with zoo.py into an empty
    directory, ``monai.bundle.load`` the network, and serve a real frame with MONAI Label's ``BundleInferTask``."""
    import monai.bundle.scripts
    from monai.bundle import load

    from common.networks.polyp_pvt import PolypPVT
    from conftest import require_data

    bundle_infer_task = pytest.importorskip("monailabel.tasks.infer.bundle").BundleInferTask
    frame = sorted((require_data("polyp") / "Kvasir" / "images").iterdir())[0]
    for config in ("train.json", "inference.json"):  # a PVTv2-b0 bundle: 15 MB of weights instead of b2's 100 MB
        path = bundles_dir / BUNDLE / "configs" / config
        path.write_text(json.dumps({**json.loads(path.read_text()), "backbone": "pvt_v2_b0", "image_size": 64}))
    torch.manual_seed(0)
    weights = PolypPVT(backbone="pvt_v2_b0").state_dict()
    torch.save(weights, bundles_dir / BUNDLE / "models" / "model.pt")
    folder, url = http_zoo
    package(bundles_dir, folder, include_weights=True, base_url=url)
    target = tmp_path / "empty"
    target.mkdir()
    done = zoo.install(BUNDLE, f"{url}/model_info.json", str(target))
    assert done["sha256"] == sha256(folder / f"{BUNDLE}_v{VERSION}.zip")

    def no_download(**kwargs):
        raise AssertionError(f"monai.bundle.load tried to download: {kwargs}")

    monkeypatch.setattr(monai.bundle.scripts, "download", no_download)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.warns(UserWarning, match="Only proceed if this config is from a source you trust"):
        net = load(name=BUNDLE, bundle_dir=str(target), workflow_type="inference", source="github", device="cpu")
    assert isinstance(net, PolypPVT)
    loaded = net.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert list(cwd.iterdir()) == []  # building the network wrote nothing (no data, no outputs)

    task = bundle_infer_task(str(target / BUNDLE), conf={"preload": "false"})
    assert (task.dimension, task.labels) == (2, {"polyp": 1})
    mask_file, _ = task({"image": str(frame), "device": "cpu", "result_extension": ".png"})
    with Image.open(frame) as src, Image.open(mask_file) as mask:
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", src.size)
    Path(mask_file).unlink()
