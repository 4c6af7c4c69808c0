"""common.networks.mil: official parameter counts, shapes, hand-computed ABMIL / DSMIL pooling, the student flag and
the torchvision checkpoint loader (specs/endoked.md §2.3, §7 row 1; specs/official_figures.md §4b)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision import models

from common.networks.mil import AttentionMILHead, DSMILHead, EndoKEDMIL, InstanceClassifierHead, ResNetBagEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model() -> EndoKEDMIL:
    torch.manual_seed(0)
    return EndoKEDMIL().eval()


def test_parameter_counts_match_official(model):
    # Source: specs/official_figures.md §4b, measured on zwyang6/ENDOKED@69167cef
    # (train_Endo_BagDistillation_SharedEnc_Similarity_StuFilter.py:448-451, resnet18 weights=None).
    assert count(model.encoder) == 11_176_512
    assert count(model.teacher1) == 2_106_371
    assert count(model.teacher2) == 3_682_310
    assert count(model.student) == 18_890_754
    assert count(model) == 35_855_947
    # per-child counts of the same table
    assert [count(c) for c in model.encoder.children()] == [9_408, 128, 0, 0, 147_968, 525_568, 2_099_712,
                                                            8_393_728, 0]
    assert {n: count(c) for n, c in model.teacher1.named_children()} == {
        "classifier": 1_579_008, "attention": 525_313, "top_layer": 2_050}
    assert {n: count(c) for n, c in model.teacher2.named_children()} == {
        "classifier": 1_574_912, "fc_dsmil": 2_050, "q_dsmil": 1_049_600, "v_dsmil": 1_049_600,
        "fcc_dsmil": 4_098, "top_layer": 2_050}
    assert {n: count(c) for n, c in model.student.named_children()} == {"classifier": 18_882_560, "top_layer": 8_194}
    # state_dict keys: encoder 120, ABMIL 20, DSMIL 14, student 6 = 160
    assert [len(getattr(model, p).state_dict()) for p in ("encoder", "teacher1", "teacher2", "student")] == [
        120, 20, 14, 6]
    assert len(model.state_dict()) == 160


def test_encoder_children_are_torchvision_resnet18_without_fc(model):
    names = [n for n, _ in models.resnet18(weights=None).named_children()]
    assert [n for n, _ in model.encoder.named_children()] == names[:-1] and names[-1] == "fc"
    assert ResNetBagEncoder("resnet50").out_features == 2048


def test_output_shapes(model):
    # official_figures §4b: encoder [N, 512]; ABMIL and DSMIL ([1, 2], [1, N]); student [N, 2]
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        h = model.encoder(x)
        assert h.shape == (4, 512)
        assert [t.shape for t in model.teacher1(h)] == [(1, 2), (1, 4)]
        assert [t.shape for t in model.teacher2(h)] == [(1, 2), (1, 4)]
        assert model(x).shape == (4, 2)


def test_head_linear_init_is_normal_001():
    torch.manual_seed(0)
    head = InstanceClassifierHead()
    w = head.classifier[4].weight.detach()  # 4096 x 4096 draws
    assert abs(float(w.std()) - 0.01) < 1e-4 and abs(float(w.mean())) < 1e-4
    assert torch.all(head.classifier[4].bias == 0) and torch.all(head.top_layer.bias == 0)


def test_abmil_attention_pooling_by_hand():
    head = AttentionMILHead(in_features=2, hidden_features=2, attention_features=1, num_classes=2, dropout=0.0)
    head.classifier = nn.Identity()  # test the pooling on given z_i
    head.eval()
    with torch.no_grad():
        head.attention[0].weight.copy_(torch.tensor([[1.0, 0.0]]))  # W1 z = z_0
        head.attention[0].bias.zero_()
        head.attention[2].weight.fill_(2 * math.log(2))  # w2 = 2 ln 2
        head.attention[2].bias.zero_()
        head.top_layer.weight.copy_(torch.tensor([[0.0, 0.5], [0.0, -0.5]]))
        head.top_layer.bias.copy_(torch.tensor([0.0, 1.0]))
    z = torch.tensor([[0.0, 4.0], [0.0, 8.0], [math.atanh(0.5), 2.0]])
    logits, scores = head(z)
    # a = 2 ln2 * tanh(z_0) = [0, 0, 2 ln2 * 0.5] = [0, 0, ln 2] (pre-softmax scores are returned)
    assert torch.allclose(scores, torch.tensor([[0.0, 0.0, math.log(2)]]), atol=1e-6)
    # alpha = [1, 1, 2] / 4; Z_1 = 4/4 + 8/4 + 2*2/4 = 4; y = [0.5*4 + 0, -0.5*4 + 1] = [2, -1]
    assert torch.allclose(logits, torch.tensor([[2.0, -1.0]]), atol=1e-5)


def test_abmil_refuses_a_single_instance_bag_in_train_mode():
    head = AttentionMILHead().train()
    with pytest.raises(ValueError, match="bag of 1 instance"):
        head(torch.randn(1, 512))
    head.eval()
    assert head(torch.randn(1, 512))[1].shape == (1, 1)


def test_dsmil_critical_instance_attention_by_hand():
    head = DSMILHead(in_features=4, hidden_features=4, num_classes=2, dropout=0.0)
    head.classifier = nn.Identity()
    head.eval()
    r2 = math.sqrt(2)
    with torch.no_grad():
        for layer in (head.fc_dsmil, head.q_dsmil, head.v_dsmil, head.fcc_dsmil):
            layer.weight.zero_()
            layer.bias.zero_()
        head.fc_dsmil.weight[0, 0] = head.fc_dsmil.weight[1, 1] = 1.0  # c_i = (z_i0, z_i1)
        head.q_dsmil.weight[0, 2] = head.q_dsmil.weight[1, 3] = 1.0  # q_i = (z_i2, z_i3, 0, 0)
        head.v_dsmil.weight.copy_(torch.eye(4))  # v_i = z_i
        head.fcc_dsmil.weight[0, 0, 0] = 1.0  # y_0 = B[0, 0]
        head.fcc_dsmil.weight[1, 1, 1] = 1.0  # y_1 = B[1, 1]
    z = torch.tensor([[2.0, 0.0, r2, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 3.0, 0.0, r2]])
    with torch.no_grad():
        logits, scores = head(z)
    # c = [[2, 0], [0, 1], [1, 3]] -> critical m_0 = 0 (c=2), m_1 = 2 (c=3)
    # class 0: q_i . q_0 / sqrt(4) = [2, 0, 0] / 2 = [1, 0, 0] -> A_0 = [e, 1, 1] / (e + 2)
    # class 1: q_i . q_2 / 2 = [0, 0, 2] / 2 = [0, 0, 1] -> A_1 = [1, 1, e] / (e + 2)
    # y_0 = B[0, 0] = (2e + 0 + 1) / (e + 2) = 6.436564 / 4.718282 = 1.364175
    # y_1 = B[1, 1] = (0 + 1 + 3e) / (e + 2) = 9.154845 / 4.718282 = 1.940292
    e = math.e
    assert torch.allclose(logits, torch.tensor([[(2 * e + 1) / (e + 2), (1 + 3 * e) / (e + 2)]]), atol=1e-5)
    assert abs(float(logits[0, 0]) - 1.364175) < 1e-5 and abs(float(logits[0, 1]) - 1.940292) < 1e-5
    # s_i = softmax(c_i)[1] = sigmoid(c_i1 - c_i0) = sigmoid([-2, 1, 2]) = [0.119203, 0.731059, 0.880797]
    assert torch.allclose(scores, torch.tensor([[0.119203, 0.731059, 0.880797]]), atol=1e-6)


def test_dsmil_top_layer_is_unused():
    torch.manual_seed(0)
    head = DSMILHead().eval()
    h = torch.randn(3, 512)
    before = head(h)
    with torch.no_grad():
        head.top_layer.weight.fill_(5.0)
    after = head(h)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_student_returns_features_flag():
    torch.manual_seed(0)
    h = torch.randn(5, 512)
    intended = InstanceClassifierHead().eval()
    faithful = InstanceClassifierHead(returns_features=True).eval()
    faithful.load_state_dict(intended.state_dict())
    logits, hidden = intended(h), faithful(h)
    assert logits.shape == (5, 2) and hidden.shape == (5, 4096)  # official_figures §4b: student forward [4, 4096]
    assert torch.all(hidden >= 0)  # ReLU output, not logits
    assert torch.allclose(intended.top_layer(hidden), logits)
    net = EndoKEDMIL(student_returns_features=True).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 4096)


def test_head_rejects_wrong_feature_shape():
    with pytest.raises(ValueError, match=r"\[N, 512\]"):
        DSMILHead()(torch.randn(3, 256))
    with pytest.raises(ValueError, match="empty"):
        InstanceClassifierHead()(torch.randn(0, 512))


def test_encoder_loads_torchvision_checkpoint_and_names_bad_files(tmp_path):
    torch.manual_seed(1)
    reference = models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)  # torchvision's format: conv1.*, ..., fc.weight, fc.bias
    encoder = ResNetBagEncoder("resnet18", pretrained_path=path)
    assert torch.equal(encoder.conv1.weight, reference.conv1.weight)
    assert torch.equal(encoder.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNetBagEncoder(pretrained_path=tmp_path / "missing.pth")
    wrong = tmp_path / "resnet50.pth"
    torch.save(models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet50.pth"):
        ResNetBagEncoder("resnet18", pretrained_path=wrong)
    with pytest.raises(ValueError, match="unknown arch"):
        ResNetBagEncoder("vgg16")
