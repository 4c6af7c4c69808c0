"""timm backbones with local checkpoints (common/networks/timm_backbone.py): the formats Sparsam / DINO release.

A tiny XCiT (embed 48, depth 2, 4 heads, 1 class-attention layer; ~0.1 M parameters) stands in for XCiT-S12/8;
the full-size parameter count is checked on the meta device (no memory, no weights).
"""

from __future__ import annotations

import pytest
import timm
import torch

from common.networks.timm_backbone import backbone_state_dict, create_backbone

NAME = "xcit_small_12_p8_224"
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 4, "cls_attn_layers": 1}


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """State dict of a tiny XCiT (``num_classes=0``) with seeded weights and non-default BatchNorm statistics."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, num_classes=0, **TINY)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if key.endswith("running_mean"):
            state[key] += 0.5  # so that a load is distinguishable from a fresh initialisation
    return state


def fresh_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return timm.create_model(NAME, num_classes=0, **TINY).state_dict()


def assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def save(tmp_path, obj, name: str = "ckpt.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_no_checkpoint_gives_pooled_features():
    model = create_backbone(NAME, kwargs=TINY)
    assert model.num_features == 48
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 48)  # num_classes=0: class-token embedding [B, D]


def test_plain_state_dict(tmp_path, source):
    assert_loaded(create_backbone(NAME, checkpoint=save(tmp_path, source), kwargs=TINY), source)


def test_teacher_is_preferred_over_student(tmp_path, source):
    other = fresh_state()
    checkpoint = {"student": {f"backbone.{k}": v for k, v in other.items()},
                  "teacher": {f"backbone.{k}": v for k, v in source.items()},
                  "epoch": 3}
    assert_loaded(create_backbone(NAME, checkpoint=save(tmp_path, checkpoint), kwargs=TINY), source)


def test_student_only(tmp_path, source):
    checkpoint = {"student": {f"backbone.{k}": v for k, v in source.items()}, "optimizer": {}}
    assert_loaded(create_backbone(NAME, checkpoint=save(tmp_path, checkpoint), kwargs=TINY), source)


def test_ddp_module_prefix(tmp_path, source):
    # DINO's own checkpoints: {"teacher": {"module.backbone.<key>": ...}}; also a bare "module.<key>" state dict
    checkpoint = {"teacher": {f"module.backbone.{k}": v for k, v in source.items()}}
    assert_loaded(create_backbone(NAME, checkpoint=save(tmp_path, checkpoint), kwargs=TINY), source)
    bare = {f"module.{k}": v for k, v in source.items()}
    assert_loaded(create_backbone(NAME, checkpoint=save(tmp_path, bare, "bare.pt"), kwargs=TINY), source)


def test_sparsam_release_drops_the_projection_head(tmp_path, source):
    checkpoint = {f"backbone.{k}": v for k, v in source.items()}
    checkpoint["projection_head.mlp.0.weight"] = torch.zeros(8, 48)
    checkpoint["projection_head.last_layer.parametrizations.weight.original1"] = torch.zeros(16, 8)
    assert_loaded(create_backbone(NAME, checkpoint=save(tmp_path, checkpoint), kwargs=TINY), source)


def test_backbone_state_dict_keys():
    w = torch.zeros(1)
    assert backbone_state_dict({"backbone.a": w, "projection_head.b": w}) == {"a": w}
    assert backbone_state_dict({"a": w, "b": w}) == {"a": w, "b": w}  # no prefix: the backbone's own
    assert backbone_state_dict({"model": {"module.enc.a": w}}, prefix="enc.") == {"a": w}


def test_classifier_head_is_left_at_its_initialisation(tmp_path, source):
    path = save(tmp_path, {f"backbone.{k}": v for k, v in source.items()})
    torch.manual_seed(5)
    reference = timm.create_model(NAME, num_classes=3, **TINY)
    torch.manual_seed(5)  # same draws: the same head initialisation
    model = create_backbone(NAME, num_classes=3, checkpoint=path, kwargs=TINY)
    state = model.state_dict()
    assert state["head.weight"].shape == (3, 48)
    assert torch.equal(state["head.weight"], reference.state_dict()["head.weight"])
    assert torch.equal(state["head.bias"], reference.state_dict()["head.bias"])
    for key, value in source.items():
        assert torch.equal(state[key], value), key
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_wrong_shape_names_file_and_tensor(tmp_path, source):
    state = dict(source, cls_token=torch.zeros(1, 1, 64))
    path = save(tmp_path, state, "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt does not fit .*cls_token \(1, 1, 64\) vs \(1, 1, 48\)"):
        create_backbone(NAME, checkpoint=path, kwargs=TINY)


def test_missing_and_unexpected_keys(tmp_path, source):
    missing = {k: v for k, v in source.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"missing\.pt does not fit .*missing keys \['norm\.weight'\], "
                                         r"unexpected keys \[\]"):
        create_backbone(NAME, checkpoint=save(tmp_path, missing, "missing.pt"), kwargs=TINY)
    extra = dict(source, **{"extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra\.weight'\]"):
        create_backbone(NAME, checkpoint=save(tmp_path, extra, "extra.pt"), kwargs=TINY)
    # a checkpoint with a classifier does not fit a feature extractor (num_classes=0 has no head)
    headed = dict(source, **{"head.weight": torch.zeros(3, 48), "head.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys \['head\.weight', 'head\.bias'\]"):
        create_backbone(NAME, checkpoint=save(tmp_path, headed, "headed.pt"), kwargs=TINY)


def test_missing_unreadable_and_non_dict_files(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        create_backbone(NAME, checkpoint=tmp_path / "absent.pt", kwargs=TINY)
    assert "backbone checkpoint" in str(missing.value) and "absent.pt" in str(missing.value)
    assert "not found" in str(missing.value)
    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError) as unreadable:
        create_backbone(NAME, checkpoint=tmp_path / "garbage.pt", kwargs=TINY)
    assert "garbage.pt" in str(unreadable.value) and "read" in str(unreadable.value)
    with pytest.raises(ValueError, match=r"list\.pt holds a list, not a state dict"):
        create_backbone(NAME, checkpoint=save(tmp_path, [torch.zeros(1)], "list.pt"), kwargs=TINY)


def test_xcit_small_parameter_count_matches_the_reference():
    # specs/official_figures.md §5, "check" line: timm.create_model("xcit_small_12_p8_224", num_classes=0)
    with torch.device("meta"):
        model = create_backbone(NAME)
    assert sum(p.numel() for p in model.parameters()) == 25_828_032
    assert model.num_features == 384
