"""What the MONAI model-zoo CI checks, for every bundle of the collection, offline.

Usage::

    python scripts/verify_bundles.py                       # every folder under bundles/
    python scripts/verify_bundles.py --bundles endoked_polyp_segmentation
    python scripts/verify_bundles.py --schema path/to/meta_schema_20240725.json

Per bundle (specs/monai_bundles.md §2.1, the zoo's ``ci/verify_bundle.py`` in "full" mode, without a GPU):

1. files: ``LICENSE``, ``configs/metadata.json``, ``configs/inference.json``, ``configs/train.json``;
2. ``version`` present and listed in ``changelog``;
3. ``monai.bundle.verify_metadata`` against the 20240725 schema, read from a local file (md5 pinned, no download);
4. ``monai.bundle.verify_net_in_out`` of ``network_def`` with the inference config;
5. ``monai.bundle.ckpt_export`` of a checkpoint (``models/model.pt``, or the randomly initialised network's
   state dict when the bundle ships no weights) to TorchScript by tracing at the metadata's input shape
   (PVTv2's optional spatial-reduction layers are not scriptable), reloaded with ``torch.jit.load`` and
   compared with the eager network on the same input;
6. ``ConfigWorkflow(...).check_properties() == []`` for ``train`` and ``inference`` (``load_pretrain=False``).

Checks 4 and 5 also run for every network override of a bundle (``configs/networks/<name>.json`` merged over
``inference.json``, randomly initialised), reported as ``<bundle>[<name>]``.

Exit status 0 when every check of every bundle passes; otherwise 1, after a list of the failures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import fire
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"  # meta_schema_20240725.json, as MONAI's own tests pin it
DEFAULT_SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json")

logger = logging.getLogger("verify_bundles")


def _check_files(bundle: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")


def _check_version(bundle: Path) -> None:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    version = meta.get("version")
    if not version:
        raise ValueError("metadata.json has no 'version'")
    if version not in meta.get("changelog", {}):
        raise ValueError(f"version {version} is not in the changelog")


def _check_schema(bundle: Path, schema: Path) -> None:
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema),
                    hash_val=SCHEMA_MD5, hash_type="md5")


def _inference_configs(bundle: Path, override: Path | None) -> list[str]:
    """``inference.json``, followed by a network override file when one is given."""
    return [str(bundle / "configs" / "inference.json")] + ([str(override)] if override else [])


def _check_net_io(bundle: Path, override: Path | None = None) -> None:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=_inference_configs(bundle, override), device="cpu", bundle_root=str(bundle))


def _check_export(bundle: Path, override: Path | None = None) -> None:
    from monai.bundle import ConfigParser, ckpt_export
    from monai.bundle.scripts import _get_fake_spatial_shape

    parser = ConfigParser()
    parser.read_config(_inference_configs(bundle, override))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    image = parser.get("_meta_#network_data_format#inputs#image")
    net = parser.get_parsed_content("network_def").eval()
    shape = _get_fake_spatial_shape(image["spatial_shape"], p=1, n=1, any=1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = bundle / "models" / "model.pt"
        if override is not None or not ckpt.is_file():  # the shipped weights belong to the default network
            ckpt = Path(tmp) / "model.pt"
            torch.save(net.state_dict(), ckpt)
        ts_path = Path(tmp) / "model.ts"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still what the zoo ships
            ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(ckpt),
                        meta_file=str(bundle / "configs" / "metadata.json"),
                        config_file=_inference_configs(bundle, override), bundle_root=str(bundle),
                        use_trace=True, input_shape=[1, image["num_channels"], *shape])
            scripted = torch.jit.load(str(ts_path))
        net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        x = torch.rand(1, image["num_channels"], *shape)
        with torch.no_grad():
            expected, got = net(x), scripted(x)
        if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
            raise ValueError(f"TorchScript output differs from the eager network by {(expected - got).abs().max():.2e}")


def _check_properties(bundle: Path) -> None:
    from monai.bundle import ConfigWorkflow

    for workflow_type, config, override in (("train", "train.json", {}),
                                            ("inference", "inference.json", {"load_pretrain": False})):
        wf = ConfigWorkflow(config_file=str(bundle / "configs" / config),
                            meta_file=str(bundle / "configs" / "metadata.json"),
                            logging_file=False, workflow_type=workflow_type, bundle_root=str(bundle), **override)
        wf.initialize()
        missing = wf.check_properties()
        if missing:
            raise ValueError(f"{config}: check_properties() reports {missing}")


CHECKS: dict[str, Callable[..., None]] = {
    "files": _check_files,
    "version": _check_version,
    "metadata schema": _check_schema,
    "verify_net_in_out": _check_net_io,
    "ckpt_export + reload": _check_export,
    "check_properties": _check_properties,
}


def verify(bundles: str | list[str] | None = None, schema: str | None = None, bundles_dir: str | None = None) -> None:
    """Run the zoo checks on the named bundles (default: all under ``bundles/``) and exit non-zero on failure.

    Args:
        bundles: bundle names (folder names under ``bundles_dir``), comma-separated or a list.
        schema: local copy of ``meta_schema_20240725.json`` (default: ``$FRUGALZOO_SCHEMA`` or
            ``../shared/schemas/meta_schema_20240725.json``); its md5 must be the pinned one.
        bundles_dir: folder holding the bundles (default: ``<repo>/bundles``).
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root = Path(bundles_dir) if bundles_dir else REPO_ROOT / "bundles"
    names = bundles.split(",") if isinstance(bundles, str) else bundles
    folders = [root / n for n in names] if names else sorted(p for p in root.iterdir() if (p / "configs").is_dir())
    schema_path = Path(schema or os.environ.get("FRUGALZOO_SCHEMA", DEFAULT_SCHEMA))
    failures: list[str] = []
    if not schema_path.is_file():
        failures.append(f"schema file {schema_path} not found: pass --schema (MONAI's meta_schema_20240725.json)")
    elif hashlib.md5(schema_path.read_bytes()).hexdigest() != SCHEMA_MD5:
        failures.append(f"schema file {schema_path} is not meta_schema_20240725.json (md5 differs from {SCHEMA_MD5})")
    for folder in folders:
        if not folder.is_dir():
            failures.append(f"{folder.name}: no such bundle folder {folder}")
            continue
        for name, check in CHECKS.items():
            if name == "metadata schema" and failures and "schema file" in failures[0]:
                failures.append(f"{folder.name}: {name}: skipped (no usable schema file)")
                continue
            try:
                check(folder, schema_path) if name == "metadata schema" else check(folder)
            except Exception as err:  # every failure is reported, whatever it raises
                logger.debug(traceback.format_exc())
                failures.append(f"{folder.name}: {name}: {type(err).__name__}: {err}")
                continue
            print(f"{folder.name}: {name}: ok", flush=True)
        for override in sorted((folder / "configs" / "networks").glob("*.json")):
            for name in ("verify_net_in_out", "ckpt_export + reload"):
                label = f"{folder.name}[{override.stem}]: {name}"
                try:
                    CHECKS[name](folder, override)
                except Exception as err:  # every failure is reported, whatever it raises
                    logger.debug(traceback.format_exc())
                    failures.append(f"{label}: {type(err).__name__}: {err}")
                    continue
                print(f"{label}: ok", flush=True)
    if failures:
        print(f"\n{len(failures)} check(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"\nall checks passed for {len(folders)} bundle(s)")


if __name__ == "__main__":
    fire.Fire(verify)
