"""The host registry of the CD-TG bundle (:mod:`common.networks.fewshot_hosts`) and what the hosts share
(:mod:`common.networks.fewshot_host`): names and errors, text-guide channels, fine-tuning defaults, checkpoint
folders, building every host from the bundle's ids, the call contract's errors, the uniform training and fine-tuning
hooks."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from common.networks.cdtg import TextGuidedPrototypes
from common.networks.dmtnet import DMTNet
from common.networks.fewshot_host import finetuned, shots_as_batch, supports_finetuning
from common.networks.fewshot_hosts import (
    build_host,
    check_finetune_steps,
    checkpoint_folder,
    default_finetune_steps,
    display_name,
    host_comparison,
    host_entry,
    host_names,
    text_stage_channels,
)
from common.networks.ifa import IFANet
from common.networks.patnet import PATNet
from common.networks.pmm import PMMNet
from common.networks.qnet import QNet

from fewshot_host_checks import synthetic_episode

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, WIDTHS = (1, 1, 1, 1), (4, 8, 8, 16)
SMALL = {"qnet": {"channels": 16}, "pmm": {"channels": 16}}  # narrower heads than the papers' 512 / 256
TEXT_DIM = 8


def tiny_host(host: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_host(host, LAYERS, WIDTHS, options=SMALL.get(host), **kwargs)


def guide(host: str, alpha: float = 0.7) -> TextGuidedPrototypes:
    return TextGuidedPrototypes(text_stage_channels(host, WIDTHS, SMALL.get(host)), text_dim=TEXT_DIM, alpha=alpha,
                                heads=4, seed=7)


def episode(batch: int = 1, seed: int = 1):
    """A 64 px :func:`synthetic_episode` (its support square reaches the corner: every feature grid sees foreground
    and background) and text embeddings ``{"class_text", "background_text"}`` ``[B, 8]``."""
    text = torch.randn(2, batch, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return (*synthetic_episode(batch=batch, seed=seed), {"class_text": text[0], "background_text": text[1]})


def test_names_and_unknown_host():
    assert host_names() == ("patnet", "qnet", "pmm", "dmtnet", "ifa")
    assert [display_name(h) for h in host_names()] == ["PATNet", "Q-Net", "PMM", "DMTNet", "IFA"]
    assert display_name("qnet", use_text=True) == "Q-Net + CD-TG"
    message = "unknown few-shot host 'hsnet'; valid hosts: patnet, qnet, pmm, dmtnet, ifa"
    for call in (lambda: host_entry("hsnet"), lambda: build_host("hsnet"), lambda: display_name("hsnet"),
                 lambda: checkpoint_folder("hsnet", True), lambda: default_finetune_steps("hsnet")):
        with pytest.raises(ValueError, match=message):
            call()


def test_text_stage_channels():
    # PATNet / DMTNet: 4 x widths of layer2..4; ResNet-50 widths (64, 128, 256, 512) -> (512, 1024, 2048)
    assert text_stage_channels("patnet") == text_stage_channels("dmtnet") == (512, 1024, 2048)
    assert text_stage_channels("patnet", WIDTHS) == (32, 32, 64)  # 4 x (8, 8, 16)
    # Q-Net: its two paths are reduced to `channels` (512) whatever the ResNet; PMM: its 256-channel layer5
    assert text_stage_channels("qnet", WIDTHS) == (512, 512)
    assert text_stage_channels("qnet", WIDTHS, {"channels": 16}) == (16, 16)
    assert text_stage_channels("pmm") == (256,) and text_stage_channels("pmm", None, {"channels": 16}) == (16,)
    # IFA: layer3's 4 x 256 = 1024 channels; 4 x 8 = 32 for the tiny widths
    assert text_stage_channels("ifa") == (1024,) and text_stage_channels("ifa", WIDTHS) == (32,)
    with pytest.raises(ValueError, match=r"backbone_widths must list 4 positive values.*first 3.*\[8, 16, 32\]"):
        text_stage_channels("ifa", (8, 16, 32))


def test_finetune_steps_defaults_and_refusal():
    assert {h: default_finetune_steps(h) for h in host_names()} == {"patnet": 0, "qnet": 0, "pmm": 0, "dmtnet": 1,
                                                                   "ifa": 20}
    # the registry's paper defaults are the hosts' own: DMTNet's TSF 1 step, IFA's fine-tuning 20
    assert inspect.signature(DMTNet.finetune).parameters["steps"].default == 1
    assert inspect.signature(IFANet.finetune).parameters["steps"].default == 20
    assert [h for h in host_names() if host_entry(h).finetune_steps is not None] == ["patnet", "dmtnet", "ifa"]
    assert all(supports_finetuning(tiny_host(h)) for h in ("patnet", "dmtnet", "ifa"))
    assert not any(supports_finetuning(tiny_host(h)) for h in ("qnet", "pmm"))
    assert check_finetune_steps("patnet", 3) == 3 and check_finetune_steps("qnet", 0) == 0
    with pytest.raises(ValueError, match=r"host 'qnet' \(Q-Net\) has no test-time fine-tuning, so finetune_steps "
                                         r"must be 0, got 3; hosts that fine-tune: patnet, dmtnet, ifa"):
        check_finetune_steps("qnet", 3)
    with pytest.raises(ValueError, match="integer >= 0"):
        check_finetune_steps("ifa", -1)


def test_checkpoint_folders_and_comparison():
    # the default (PATNet + CD-TG) keeps models/model.pt, which inference.json and MONAI Label load
    assert checkpoint_folder("patnet", True) == "models" and checkpoint_folder("patnet", False) == "models/patnet"
    assert checkpoint_folder("qnet", True) == "models/qnet_cdtg" and checkpoint_folder("qnet", False) == "models/qnet"
    base, guided = torch.nn.Identity(), torch.nn.Identity()
    assert host_comparison("ifa", base, guided, "root") == {"IFA": (base, "root/models/ifa/model.pt"),
                                                            "IFA + CD-TG": (guided, "root/models/ifa_cdtg/model.pt")}
    assert host_comparison("patnet", base, None, "/b") == {"PATNet": (base, "/b/models/patnet/model.pt")}


def test_build_every_host_from_the_bundle_ids():
    classes = {"patnet": PATNet, "qnet": QNet, "pmm": PMMNet, "dmtnet": DMTNet, "ifa": IFANet}
    q, s, sm, _, text = episode()
    for host in host_names():
        net = tiny_host(host, text_guide=guide(host)).eval()
        assert type(net) is classes[host]
        assert getattr(net, "kshot_forward", False) is (host == "ifa")  # IFA merges K shots by prototype mean
        with torch.no_grad():
            assert net(q, s, sm, **text).shape == (1, 2, 64, 64), host
    # hosts cut after layer3 take the first three of the four layer1..layer4 entries
    assert len(tiny_host("pmm").model_res.layer3) == 1 and not hasattr(tiny_host("ifa"), "layer4")
    # ResNet-101 (3, 4, 23, 3) is Q-Net's default backbone, ResNet-50 (3, 4, 6, 3) the others'
    assert host_entry("qnet").paper_layers == (3, 4, 23, 3) and host_entry("dmtnet").paper_layers == (3, 4, 6, 3)


@pytest.mark.parametrize("host", host_names())
def test_call_contract_errors_name_the_host(host: str):
    net = tiny_host(host)
    name = type(net).__name__
    q, s, sm, _, text = episode()
    with pytest.raises(ValueError, match=rf"{name}: query_image must be \[B, 3, H, W\], got \(1, 1, 64, 64\)"):
        net(q[:, :1], s, sm)
    with pytest.raises(ValueError, match=rf"{name}: support_image"):
        net(q, s[..., :32], sm)
    with pytest.raises(ValueError, match=rf"{name}: support_image"):
        net(q, torch.cat([s, s]), torch.cat([sm, sm]))  # 2 supports for 1 query
    with pytest.raises(ValueError, match=rf"{name}: support_mask must be"):
        net(q, s, sm[:, :32])
    with pytest.raises(ValueError, match=rf"{name}: give both support_image and support_mask, or neither"):
        net(q, support_mask=sm)
    with pytest.raises(ValueError, match=rf"{name}: no support given and none primed"):
        net(q)
    with pytest.raises(ValueError, match=rf"{name}.set_support: support masks \[1\] are empty \(no foreground pixel\)"):
        net.set_support(torch.cat([s, s]), torch.cat([sm, torch.zeros_like(sm)]))
    with pytest.raises(ValueError, match=rf"{name}.set_support: support_masks must be \[K, H, W\] = \(1, 64, 64\)"):
        net.set_support(s, sm[:, :32])
    guided = tiny_host(host, text_guide=guide(host))
    with pytest.raises(ValueError, match=rf"{name}: a text_guide is set, so class_text and background_text"):
        guided(q, s, sm, class_text=text["class_text"])
    with pytest.raises(ValueError, match=rf"{name}.set_support: the network has a text guide"):
        guided.set_support(s, sm)


def test_patnet_through_the_registry_is_the_bundles_former_network():
    # same arguments, same random-number draws: the registry changes nothing for the default host
    built = tiny_host("patnet", seed=3)
    torch.manual_seed(3)
    direct = PATNet(LAYERS, WIDTHS)
    assert built.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in built.state_dict().items())


def test_bad_options_dropout_and_backbone():
    with pytest.raises(ValueError, match=r"\['stride'\] are not arguments of IFANet; it takes \['stem', 'refine', "
                                         r"'fuse_query_prototypes'\]"):
        build_host("ifa", LAYERS, WIDTHS, options={"stride": 2})
    with pytest.raises(ValueError, match=r"\['layers'\] are set by the bundle's own ids"):
        build_host("pmm", LAYERS, WIDTHS, options={"layers": (1, 1, 1)})
    with pytest.raises(ValueError, match=r"host 'dmtnet' \(DMTNet\) has no dropout to set \(got dropout=0.1\); "
                                         "hosts with one: patnet"):
        build_host("dmtnet", LAYERS, WIDTHS, dropout=0.1)
    assert tiny_host("patnet", dropout=0.1).dropout == 0.1  # MONAI Label's epistemic scoring sets it
    with pytest.raises(ValueError, match=r"backbone_layers must list 4 positive values.*\[1, 1, 1\]"):
        build_host("qnet", (1, 1, 1), WIDTHS)
    assert build_host("ifa", LAYERS, WIDTHS, options={"stem": "torchvision"}).layer0[0].kernel_size == (7, 7)


def test_patnet_checkpoint_in_the_official_format(tmp_path):
    source = tiny_host("patnet", seed=1)
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "best_model.pt")  # DDP names
    loaded = tiny_host("patnet", seed=2, checkpoint=tmp_path / "best_model.pt", text_guide=guide("patnet"))
    assert torch.equal(loaded.reference_layer1.weight, source.reference_layer1.weight)
    wrong = {k.replace("reference_layer1", "reference_layer9"): v for k, v in source.state_dict().items()}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong\.pt.*missing.*reference_layer1\.weight.*unexpected.*reference_layer9"):
        tiny_host("patnet", checkpoint=tmp_path / "wrong.pt")


def test_episode_loss_is_the_hosts_training_objective():
    q, s, sm, qm, text = episode(batch=2)
    # Q-Net: L_q + L_align of training_loss, with its log-probability logits (same ADaIN draws under the same seed)
    net = tiny_host("qnet", text_guide=guide("qnet")).train()
    torch.manual_seed(4)
    loss, logits = net.episode_loss(q, s, sm, qm, **text)
    torch.manual_seed(4)
    expected = net.training_loss(q, s, sm, qm, **text)
    assert torch.equal(loss, expected["loss"]) and torch.equal(logits, expected["logits"])
    assert loss > expected["query_loss"]  # the alignment term is in
    # DMTNet: foreground + background + 0.5 coarse of one pass (same anchor-dropout draws under the same seed)
    net = tiny_host("dmtnet").train()
    torch.manual_seed(5)
    loss, logits = net.episode_loss(q, s, sm, qm)
    torch.manual_seed(5)
    output = net.episode_outputs(q, s, sm)
    assert torch.equal(loss, net.training_loss(output, qm)) and torch.equal(logits, output.logits)
    assert loss > F.cross_entropy(logits, qm.long())  # more than the trainer's plain cross-entropy
    # IFA: the whole T = 1 objective (output term included) and the output forward returns
    net = tiny_host("ifa").train()
    loss, logits = net.episode_loss(q, s, sm, qm)
    assert torch.equal(loss, net.training_loss(q, s, sm, qm, include_output_term=True))
    torch.testing.assert_close(logits, net(q, s, sm), atol=1e-6, rtol=0)
    assert not any(hasattr(tiny_host(h), "episode_loss") for h in ("patnet", "pmm"))  # cross-entropy hosts


def test_shots_as_batch_by_hand():
    # B = 2 episodes of K = 3 shots -> 6 pairs, episode-major: queries q0 q0 q0 q1 q1 q1, supports s00 s01 s02 s10 ...
    q = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    s = torch.arange(6.0).view(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2)
    m = torch.arange(6.0).view(2, 3, 1, 1).expand(2, 3, 2, 2)
    ct = torch.tensor([[10.0], [20.0]])
    q6, s6, m6, ct6, bt6 = shots_as_batch(q, s, m, ct, None)
    assert q6[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1] and s6[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert m6.shape == (6, 2, 2) and m6[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert ct6[:, 0].tolist() == [10, 10, 10, 20, 20, 20] and bt6 is None
    one_shot = (q, s[:, 0], m[:, 0], ct, ct)
    assert all(a is b for a, b in zip(shots_as_batch(*one_shot), one_shot))  # 1-shot inputs pass through
    with pytest.raises(ValueError, match=r"K-shot support_mask must be \[B, K, H, W\] = \(2, 3, 2, 2\)"):
        shots_as_batch(q, s, m[:, 0])


def test_patnet_kshot_finetune_and_restore():
    net = tiny_host("patnet").eval()
    assert [n for n, _ in net.finetune_parameters()] == [f"reference_layer{i}.weight" for i in (1, 2, 3)]
    q, s, sm, _, _ = episode()
    _, s2, sm2, _, _ = episode(seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # K = 2: finetune = finetune_anchors on the 2 (query, support_k) pairs at once
    kshot = net.finetune(q, torch.stack([s, s2], 1), torch.stack([sm, sm2], 1), steps=2)
    after = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(before)
    assert kshot == net.finetune_anchors(torch.cat([q, q]), torch.cat([s, s2]), torch.cat([sm, sm2]), steps=2)
    assert all(torch.equal(v, after[k]) for k, v in net.state_dict().items())
    # per-episode adaptation: inside `finetuned` the layer2 anchors (A_1) moved, after it everything is back
    net.load_state_dict(before)
    with finetuned(net, 3, q, s, sm) as losses:
        assert len(losses) == 3
        assert not torch.equal(net.reference_layer1.weight, before["reference_layer1.weight"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    with finetuned(net, 0, q, s, sm) as losses:  # 0 steps: nothing happens
        assert losses == []
    with pytest.raises(ValueError, match="QNet has no test-time fine-tuning"):
        with finetuned(tiny_host("qnet"), 1, q, s, sm):
            pass
