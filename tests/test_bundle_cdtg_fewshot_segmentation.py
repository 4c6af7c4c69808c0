"""The cdtg_fewshot_segmentation bundle run as users run it: episodic training with and without the text plug-in,
the evaluation sweep (targets x shots x models x alpha), inference from a support set, real WBC episodes, every host
of the registry (``--host qnet`` ...) with its own objective and test-time fine-tuning, bad input.

Workflows run in-process through ``ConfigWorkflow`` (as the model zoo's CI does), shrunk through top-level ids only
(a ResNet with one bottleneck per stage and widths 4-16, 64 px); ``bundle_root`` points at a temporary folder so
that nothing is written into the repository. The text encoder is the real all-MiniLM-L6-v2 (packaged offline).
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.category_text import prompt_file
from common.networks.fewshot_hosts import default_finetune_steps, display_name, text_stage_channels

from conftest import REPO_ROOT, bundle_workflow, error_text, read_csv, require_data, run_workflow

BUNDLE = REPO_ROOT / "bundles" / "cdtg_fewshot_segmentation"
CONFIGS = BUNDLE / "configs"
TINY = {"image_size": 64, "backbone_layers": [1, 1, 1, 1], "backbone_widths": [4, 8, 8, 16], "num_workers": 0}
TRAIN = {**TINY, "epochs": 1, "batch_size": 4, "progress_bar": False}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

workflow = partial(bundle_workflow, CONFIGS)  # (bundle_root, kind, configs, **override) -> initialised workflow
run = run_workflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A bundle root with PATNet + CD-TG (models/model.pt) and plain PATNet (models/patnet/model.pt), each trained
    for one epoch on the generated demo shapes (4 source classes x 12 images: 40 training episodes, 8 validation)."""
    root = tmp_path_factory.mktemp("cdtg_bundle")
    for use_text in (True, False):
        wf = workflow(root, "train", ["train.json"], use_text=use_text, **TRAIN)
        assert wf.parser.get_parsed_content("on_demo") is True
        run(wf)
        # 12 images per class, round(0.2 * 12) = 2 to validation: 4 x 10 = 40 episodes in batches of 4
        assert wf.parser.get_parsed_content("train#trainer").state.iteration == 10
    return root


def test_training_writes_both_models(trained):
    text_model = torch.load(trained / "models" / "model.pt", weights_only=True)
    plain = torch.load(trained / "models" / "patnet" / "model.pt", weights_only=True)
    # the text model is the plain one plus its plug-in: one semantic-guided unit per ResNet stage
    assert set(plain) < set(text_model)
    assert {k.split(".")[2] for k in text_model if k.startswith("text_guide.sgu.")} == {"0", "1", "2"}
    assert not any(k.startswith("text_guide") for k in plain)
    # the frozen backbone is the same random initialisation (seed 0) in both, the learner was trained
    key = "backbone.layer4.0.conv3.weight"
    assert torch.equal(text_model[key], plain[key])
    assert (trained / "models" / "training_state_epoch=1.pt").is_file()
    assert list((trained / "cache" / "text_embeddings").glob("shapes-*.pt"))
    assert sorted(p.name for p in (trained / "models").iterdir()) == ["model.pt", "patnet", "training_state_epoch=1.pt"]


def test_evaluate_sweeps_shots_models_and_alpha(trained):
    targets = [{"name": "shapes", "kind": "class_folders", "root": str(trained / "data" / "demo_shapes" / "target"),
                "descriptions": prompt_file("shapes"), "protocol": "sample", "episodes": 4}]
    wf = workflow(trained, None, ["train.json", "evaluate.json"], targets=targets, shots=[1, 2], alphas=[0.3, 0.7],
                  **TINY)
    run(wf)
    out = trained / "eval" / "fewshot"
    rows = read_csv(out / "fewshot_results.csv")
    # 2 shots x (PATNet + CD-TG at 2 alphas) = 6 rows, 4 episodes each on the two target classes
    assert [(r["shot"], r["model"], r["alpha"]) for r in rows] == [
        (s, m, a) for s in ("1", "2") for m, a in (("PATNet", ""), ("PATNet + CD-TG", "0.3"), ("PATNet + CD-TG", "0.7"))]
    assert all(r["episodes"] == "4" and 0.0 <= float(r["miou"]) <= 100.0 for r in rows)
    assert {"iou/ring", "iou/cross"} <= set(rows[0])
    for name in ("examples_shapes_1shot.png", "examples_shapes_2shot.png", "alpha_sweep.png"):
        with Image.open(out / name) as figure:
            assert figure.format == "PNG" and min(figure.size) > 100


def test_inference_segments_queries_from_a_support_set(trained):
    wf = workflow(trained, "inference", ["inference.json"], shot=2, **TINY)
    run(wf)
    predictions = sorted((trained / "eval" / "predictions").rglob("*.png"))
    queries = [p for p in (trained / "data" / "demo_shapes" / "target" / "ring").glob("*.png")
               if not p.name.endswith("_mask.png")]
    assert len(predictions) == len(queries) == 12
    for mask_file in predictions[:3]:
        mask = np.asarray(Image.open(mask_file))
        assert mask.shape == (128, 128) and set(np.unique(mask).tolist()) <= {0, 255}
    # the primed network is the trained text model with the 2 first ring images as its supports
    network = wf.parser.get_parsed_content("network")
    assert network.support_images.shape == (2, 3, 64, 64) and network.class_text.shape == (384,)


def test_real_wbc_episodes_train_and_evaluate(tmp_path):
    """Source: the real WBC nuclei; target: the real WBC cytoplasm (a different class of the same images)."""
    wbc = require_data("wbc")
    source = [{"kind": "wbc", "root": str(wbc), "classes": ["nucleus"]}]
    descriptions = [prompt_file("wbc")]
    wf = workflow(tmp_path, "train", ["train.json"], source=source, descriptions=descriptions,
                  **{**TRAIN, "epoch_length": 3, "val_episodes": 4})
    run(wf)
    assert wf.parser.get_parsed_content("on_demo") is False
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 3
    targets = [{"name": "wbc", "kind": "wbc", "root": str(wbc), "classes": ["cytoplasm"], "descriptions":
                descriptions[0], "protocol": "sample", "episodes": 3}]
    run(workflow(tmp_path, None, ["train.json", "evaluate.json"], source=source, descriptions=descriptions,
                 targets=targets, shots=[1], alphas=[0.7], **TINY))
    (row,) = read_csv(tmp_path / "eval" / "fewshot" / "fewshot_results.csv")
    assert (row["target"], row["model"], row["episodes"]) == ("wbc", "PATNet + CD-TG", "3") and "iou/cytoplasm" in row


def test_a_class_without_description_is_named(tmp_path):
    prompts = json.loads(Path(prompt_file("shapes")).read_text())
    prompts["categories"] = [c for c in prompts["categories"] if c["name"] != "star"]
    for i, category in enumerate(prompts["categories"]):
        category["id"] = i
    bad = tmp_path / "shapes_without_star.json"
    bad.write_text(json.dumps(prompts))
    with pytest.raises(Exception) as info:
        run(workflow(tmp_path, "train", ["train.json"], descriptions=[str(bad)], **TRAIN))
    assert "star" in error_text(info.value)


def test_support_set_errors_are_named(trained, tmp_path):
    with pytest.raises(Exception) as info:
        workflow(trained, "inference", ["inference.json"], shot=13, load_pretrain=False, **TINY).run()
    assert "13-shot needs 13 images of 'ring', found 12" in error_text(info.value)
    # a support whose mask is empty: the support set is refused, naming the mask
    support = tmp_path / "support" / "ring"
    support.mkdir(parents=True)
    source = trained / "data" / "demo_shapes" / "target" / "ring"
    shutil.copy(source / "ring_000.png", support / "a.png")
    Image.new("L", (128, 128)).save(support / "a_mask.png")
    shutil.copy(source / "ring_001.png", support / "b.png")
    Image.new("L", (128, 128)).save(support / "b_mask.png")
    with pytest.raises(Exception) as info:
        workflow(trained, "inference", ["inference.json"], support_source={"kind": "class_folders",
                 "root": str(tmp_path / "support")}, load_pretrain=False, **TINY).run()
    assert "class(es) ['ring'] have no item with a non-empty foreground" in error_text(info.value)


# ------------------------------------------------------------------------------------------ the other hosts
HOSTS = ["qnet", "pmm", "dmtnet", "ifa"]  # PATNet, the default host, is run by the tests above
HOST_TRAIN = {**TRAIN, "batch_size": 2, "epoch_length": 1, "val_episodes": 2}
EPISODE_LOSS = {"qnet": True, "pmm": False, "dmtnet": True, "ifa": True}  # a paper objective beyond cross-entropy


def _short_finetuning(host: str) -> int:
    """The paper's test-time steps, cut to 1 (DMTNet's default is 1, IFA's 20; 0 for hosts without)."""
    return min(default_finetune_steps(host), 1)


@pytest.fixture(scope="module", params=HOSTS)
def host_trained(request, tmp_path_factory) -> tuple[str, Path]:
    """A bundle root with the host alone (``models/<host>``) and the host + CD-TG (``models/<host>_cdtg``), each
    trained for one iteration of 2 demo episodes, validated on 2."""
    host = request.param
    root = tmp_path_factory.mktemp(f"cdtg_{host}")
    for use_text in (False, True):
        wf = workflow(root, "train", ["train.json"], host=host, use_text=use_text, **HOST_TRAIN)
        run(wf)
        trainer = wf.parser.get_parsed_content("train#trainer")
        assert trainer.state.iteration == 1 and trainer.uses_episode_loss is EPISODE_LOSS[host]
    return host, root


def test_every_host_trains_into_its_own_folders(host_trained):
    host, root = host_trained
    plain = torch.load(root / "models" / host / "model.pt", weights_only=True)
    guided = torch.load(root / "models" / f"{host}_cdtg" / "model.pt", weights_only=True)
    assert sorted(p.name for p in (root / "models").iterdir()) == [host, f"{host}_cdtg"]
    assert set(plain) < set(guided) and all(k.startswith("text_guide.") for k in set(guided) - set(plain))
    # one semantic-guided unit per feature map the host fuses: Q-Net's 2 paths, PMM's and IFA's one map, DMTNet's 3
    units = {k.split(".")[2] for k in guided if k.startswith("text_guide.sgu.")}
    expected = {"qnet": 2, "dmtnet": 3}.get(host, 1)
    assert len(units) == len(text_stage_channels(host, TINY["backbone_widths"])) == expected


def test_every_host_evaluates_against_its_cdtg_version(host_trained):
    host, root = host_trained
    targets = [{"name": "shapes", "kind": "class_folders", "root": str(root / "data" / "demo_shapes" / "target"),
                "descriptions": prompt_file("shapes"), "protocol": "sample", "episodes": 2}]
    steps = _short_finetuning(host)
    wf = workflow(root, None, ["train.json", "evaluate.json"], host=host, targets=targets, shots=[2], alphas=[0.7],
                  finetune_steps=steps, **TINY)
    run(wf)
    rows = read_csv(root / "eval" / "fewshot" / "fewshot_results.csv")
    name = display_name(host)
    assert [(r["shot"], r["model"], r["alpha"], r["episodes"]) for r in rows] == [
        ("2", name, "", "2"), ("2", f"{name} + CD-TG", "0.7", "2")]
    assert wf.parser.get_parsed_content("sweep").finetune_steps == steps
    # fine-tuned per episode, restored after each: the evaluated networks hold their trained weights again
    networks = wf.parser.get_parsed_content("evaluation_networks")
    for network, folder in zip(networks.values(), (host, f"{host}_cdtg")):
        saved = torch.load(root / "models" / folder / "model.pt", weights_only=True)
        assert all(torch.equal(v.cpu(), saved[k]) for k, v in network.state_dict().items())


def test_every_host_segments_queries_from_a_support_set(host_trained):
    host, root = host_trained
    queries = sorted(p for p in (root / "data" / "demo_shapes" / "target" / "ring").glob("*.png")
                     if not p.name.endswith("_mask.png"))[:2]
    steps = _short_finetuning(host)
    wf = workflow(root, "inference", ["inference.json"], host=host, shot=2, finetune_steps=steps,
                  datalist=[{"image": str(p)} for p in queries], **TINY)
    run(wf)
    assert len(list((root / "eval" / "predictions").rglob("*.png"))) == 2
    assert wf.parser.get_parsed_content("inferer").steps == steps
    network = wf.parser.get_parsed_content("network")  # the host + CD-TG, primed with 2 ring supports
    assert network.support_images.shape == (2, 3, 64, 64)
    saved = torch.load(root / "models" / f"{host}_cdtg" / "model.pt", weights_only=True)
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in network.state_dict().items())  # restored after each query


def test_bad_host_alpha_and_finetuning_are_named(tmp_path):
    with pytest.raises(Exception) as info:
        run(workflow(tmp_path, "train", ["train.json"], host="hsnet", **TRAIN))
    assert "unknown few-shot host 'hsnet'; valid hosts: patnet, qnet, pmm, dmtnet, ifa" in error_text(info.value)
    with pytest.raises(Exception) as info:
        run(workflow(tmp_path, "train", ["train.json"], host="pmm", alpha=1.5, **TRAIN))
    assert "alpha must be in [0, 1], got 1.5" in error_text(info.value)
    with pytest.raises(Exception) as info:
        run(workflow(tmp_path, "inference", ["inference.json"], host="qnet", finetune_steps=3, load_pretrain=False,
                     **TINY))
    assert ("host 'qnet' (Q-Net) has no test-time fine-tuning, so finetune_steps must be 0, got 3; hosts that "
            "fine-tune: patnet, dmtnet, ifa") in error_text(info.value)


def test_a_support_too_small_for_the_pmm_mixture_is_refused(tmp_path):
    # a 6 x 6 px square of a 128 px image: 3 x 3 px at 64 px, at most one position of PMM's 9 x 9 feature grid,
    # fewer than the k = 3 prototypes of the foreground mixture
    demo = workflow(tmp_path, "inference", ["inference.json"], load_pretrain=False, **TINY)
    ring = Path(demo.parser.get_parsed_content("demo_dir")) / "target" / "ring"
    support = tmp_path / "support" / "ring"
    support.mkdir(parents=True)
    shutil.copy(ring / "ring_000.png", support / "a.png")
    mask = Image.new("L", (128, 128))
    mask.paste(255, (60, 60, 66, 66))
    mask.save(support / "a_mask.png")
    with pytest.raises(Exception) as info:
        run(workflow(tmp_path, "inference", ["inference.json"], host="pmm", load_pretrain=False,
                     support_source={"kind": "class_folders", "root": str(tmp_path / "support")}, **TINY))
    assert "too small for the mixture size k = 3" in error_text(info.value)
