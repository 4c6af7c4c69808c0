"""EndoKED-MIL networks: a shared ResNet encoder, two teacher bag heads (ABMIL, DSMIL) and a student instance head.

Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports Leveraging Large
Language and Vision Models" (EndoKED), arXiv 2310.11173, specs/endoked.md §2.3; the teacher heads follow
Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018 (ABMIL) and Li, Li & Eliceiri,
"Dual-stream Multiple Instance Learning Network for Whole Slide Image Classification with Self-supervised Contrastive
Learning", CVPR 2021 (DSMIL).

A bag is one colonoscopy exam: ``N`` frames ``[N, 3, H, W]`` -> encoder -> features ``h [N, D]`` (``D`` = 512 for
ResNet-18) -> each teacher gives bag logits ``[1, 2]`` and instance scores ``[1, N]``; the student gives instance
logits ``[N, 2]``. Child names and sizes follow the official modules, so the parameter counts match
specs/official_figures.md §4b exactly (encoder 11,176,512; ABMIL 2,106,371; DSMIL 3,682,310; student 18,890,754;
:class:`EndoKEDMIL` 35,855,947). Every ``nn.Linear`` of the heads is initialised ``N(0, 0.01)`` with bias 0
(the official ``_initialize_weights``); the DSMIL ``Conv1d`` and the BatchNorm layers keep torch's defaults.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import nn
from torchvision import models

from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "ENCODER_ARCHS",
    "ResNetBagEncoder",
    "AttentionMILHead",
    "DSMILHead",
    "InstanceClassifierHead",
    "EndoKEDMIL",
]

ENCODER_ARCHS: dict[str, int] = {"resnet18": 512, "resnet50": 2048}
"""Supported torchvision encoders and their feature size ``D``."""


def _init_linear(module: nn.Module) -> None:
    """``N(0, 0.01)`` weights and zero biases for every ``nn.Linear`` under ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _check_features(name: str, features: torch.Tensor, in_features: int) -> None:
    if features.ndim != 2 or features.shape[1] != in_features:
        raise ValueError(f"{name}: features must be [N, {in_features}] (the instances of one bag), "
                         f"got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name}: the bag is empty (0 instances)")


class ResNetBagEncoder(nn.Sequential):
    """torchvision ResNet without ``fc``: ``[N, 3, H, W] -> [N, D]`` global-average-pooled features.

    The children are torchvision's ``children()[:-1]`` under their torchvision names (``conv1, bn1, relu, maxpool,
    layer1..layer4, avgpool``), so an ImageNet checkpoint of torchvision (``resnet18-f37072fd.pth``) loads by name
    once its ``fc.*`` entries are dropped. ResNet-18: 11,176,512 parameters, 120 state-dict entries.

    Args:
        arch: ``"resnet18"`` (``D`` = 512, EndoKED's ``PretrainedResNet18_Encoder``) or ``"resnet50"`` (``D`` = 2048).
        pretrained_path: a torchvision ImageNet state dict (``.pth``) to load; ``fc.*`` keys are dropped, all others
            must match exactly. None keeps the random initialisation (weights=None).

    Raises:
        ValueError: unknown ``arch``; a checkpoint that does not match (the message names the file).
        FileNotFoundError: ``pretrained_path`` does not exist.
    """

    def __init__(self, arch: str = "resnet18", pretrained_path: str | os.PathLike | None = None) -> None:
        if arch not in ENCODER_ARCHS:
            raise ValueError(f"ResNetBagEncoder: unknown arch {arch!r}; choose one of {sorted(ENCODER_ARCHS)}")
        resnet = getattr(models, arch)(weights=None)
        super().__init__(OrderedDict(list(resnet.named_children())[:-1]))
        self.arch = arch
        self.out_features = ENCODER_ARCHS[arch]
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a torchvision ImageNet checkpoint of the same ``arch`` (``fc.*`` dropped, strict otherwise)."""
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
        load_state_dict_strict(self, state, path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[N, 3, H, W]`` -> ``[N, D]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ResNetBagEncoder: images must be [N, 3, H, W], got {tuple(images.shape)}")
        return torch.flatten(super().forward(images), 1)


class AttentionMILHead(nn.Module):
    """ABMIL teacher (EndoKED ``Bag_Classifier_Attention_Head``, teacher 1), specs/endoked.md §2.3.

    For the features ``h_i`` of one bag::

        z_i = MLP(h_i)                      Dropout-Linear(D, 1024)-BN-ReLU-Dropout-Linear(1024, 1024)-BN-ReLU
        a_i = w_2ᵀ tanh(W_1 z_i + b_1) + b_2  W_1: 1024 -> 512, w_2: 512 -> 1   (``attention``)
        α   = softmax_i(a)
        y   = W_top (Σ_i α_i z_i) + b_top    1024 -> 2                          (``top_layer``)

    Returns the bag logits ``y [1, 2]`` and the **pre-softmax** attention logits ``a [1, N]``, the instance scores
    ``s¹_i`` used for the student's pseudo labels. Sizes at the defaults: ``classifier`` 1,579,008, ``attention``
    525,313, ``top_layer`` 2,050 (total 2,106,371).

    In ``train()`` mode BatchNorm needs at least two instances per bag.

    Args:
        in_features: ``D``.
        hidden_features: width of ``z`` (1024).
        attention_features: width of the attention layer (512).
        num_classes: bag classes (2).
        dropout: dropout probability of the MLP (0.5).
    """

    def __init__(self, in_features: int = 512, hidden_features: int = 1024, attention_features: int = 512,
                 num_classes: int = 2, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_features = in_features
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_features, hidden_features), nn.BatchNorm1d(hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden_features, hidden_features), nn.BatchNorm1d(hidden_features),
            nn.ReLU(inplace=True),
        )
        self.attention = nn.Sequential(nn.Linear(hidden_features, attention_features), nn.Tanh(),
                                       nn.Linear(attention_features, 1))
        self.top_layer = nn.Linear(hidden_features, num_classes)
        _init_linear(self)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, D]`` -> (bag logits ``[1, C]``, attention logits ``[1, N]``)."""
        _check_features("AttentionMILHead", features, self.in_features)
        if self.training and features.shape[0] < 2:
            raise ValueError("AttentionMILHead: a bag of 1 instance cannot be trained (BatchNorm1d in train mode "
                             "needs >= 2 instances); drop single-image bags or evaluate in eval() mode")
        z = self.classifier(features)
        scores = self.attention(z).transpose(0, 1)  # [1, N]
        weights = torch.softmax(scores, dim=1)
        return self.top_layer(weights @ z), scores


class DSMILHead(nn.Module):
    """DSMIL teacher (EndoKED ``Bag_Classifier_DSMIL_Head``, teacher 2), specs/endoked.md §2.3.

    For the features ``h_i`` of one bag::

        z_i = MLP(h_i)                    Dropout-Linear(D, 1024)-ReLU-Dropout-Linear(1024, 1024)-ReLU (no BN)
        c_i = W_fc z_i + b_fc ∈ R^C        instance logits                        (``fc_dsmil``)
        m_k = argmax_i c_{i,k}             critical instance of class k
        q_i = W_q z_i + b_q,  v_i = W_v z_i + b_v                                 (``q_dsmil``, ``v_dsmil``)
        A_{i,k} = softmax_i( q_i · q_{m_k} / sqrt(d) ),  d = 1024
        B_k = Σ_i A_{i,k} v_i              [C, d]
        y   = Conv1d(C -> C, kernel d)(B) ∈ R^C                                    (``fcc_dsmil``)

    Returns the bag logits ``y [1, C]`` and the instance scores ``s²_i = softmax(c_i)[1]`` as ``[1, N]``.

    ``top_layer`` (Linear(1024, 2), 2,050 parameters) is never used in the forward pass: the official module defines
    it but does not call it. It is kept so that the parameter count (3,682,310) and the state-dict keys match the
    official head. Sizes at the defaults: ``classifier`` 1,574,912, ``fc_dsmil`` 2,050, ``q_dsmil`` and ``v_dsmil``
    1,049,600 each, ``fcc_dsmil`` 4,098, ``top_layer`` 2,050.

    Args:
        in_features: ``D``.
        hidden_features: ``d`` (1024).
        num_classes: ``C`` (2; the instance score is the class-1 probability).
        dropout: dropout probability of the MLP (0.5).
    """

    def __init__(self, in_features: int = 512, hidden_features: int = 1024, num_classes: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DSMILHead: num_classes must be >= 2, got {num_classes}")
        self.in_features = in_features
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_features, hidden_features), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden_features, hidden_features), nn.ReLU(inplace=True),
        )
        self.fc_dsmil = nn.Linear(hidden_features, num_classes)
        self.q_dsmil = nn.Linear(hidden_features, hidden_features)
        self.v_dsmil = nn.Linear(hidden_features, hidden_features)
        self.fcc_dsmil = nn.Conv1d(num_classes, num_classes, kernel_size=hidden_features)
        self.top_layer = nn.Linear(hidden_features, num_classes)
        _init_linear(self)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, D]`` -> (bag logits ``[1, C]``, instance scores ``softmax(c_i)[1]`` ``[1, N]``)."""
        _check_features("DSMILHead", features, self.in_features)
        z = self.classifier(features)
        instance_logits = self.fc_dsmil(z)  # [N, C]
        critical = instance_logits.argmax(dim=0)  # [C]
        queries = self.q_dsmil(z)  # [N, d]
        attention = torch.softmax(queries @ queries[critical].transpose(0, 1) / queries.shape[1] ** 0.5, dim=0)
        bag_embedding = attention.transpose(0, 1) @ self.v_dsmil(z)  # [C, d]
        bag_logits = self.fcc_dsmil(bag_embedding.unsqueeze(0)).squeeze(-1)  # [1, C]
        return bag_logits, torch.softmax(instance_logits, dim=1)[:, 1].unsqueeze(0)


class InstanceClassifierHead(nn.Module):
    """Student instance classifier (EndoKED ``Instance_Classifier_Head``), specs/endoked.md §2.3 and §7 row 1.

    ``h_i [N, D] -> Dropout-Linear(D, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU (classifier) -> u_i [N, 4096]
    -> top_layer Linear(4096, 2) -> logits [N, 2]``. Sizes at the defaults: ``classifier`` 18,882,560,
    ``top_layer`` 8,194.

    Args:
        in_features: ``D``.
        hidden_features: width of ``u`` (4096).
        num_classes: 2.
        dropout: dropout probability (0.5).
        returns_features: the official ``forward`` bug (§7 row 1, faithful): return the hidden vector ``u [N, 4096]``
            instead of the logits; the training loop then takes ``softmax(u)[:, 0]`` and ``[:, 1]`` as the class
            probabilities and ``top_layer`` is never trained. False (default) returns the logits (intended).
    """

    def __init__(self, in_features: int = 512, hidden_features: int = 4096, num_classes: int = 2,
                 dropout: float = 0.5, returns_features: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.returns_features = returns_features
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_features, hidden_features), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden_features, hidden_features), nn.ReLU(inplace=True),
        )
        self.top_layer = nn.Linear(hidden_features, num_classes)
        _init_linear(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> logits ``[N, C]`` (or the hidden ``[N, hidden_features]`` with ``returns_features``)."""
        _check_features("InstanceClassifierHead", features, self.in_features)
        hidden = self.classifier(features)
        return hidden if self.returns_features else self.top_layer(hidden)


class EndoKEDMIL(nn.Module):
    """The four EndoKED-MIL parts in one module (one state dict for the bundle's ``model.pt``).

    Children ``encoder`` (:class:`ResNetBagEncoder`), ``teacher1`` (:class:`AttentionMILHead`), ``teacher2``
    (:class:`DSMILHead`) and ``student`` (:class:`InstanceClassifierHead`); 35,855,947 parameters and 160
    state-dict entries with ResNet-18. ``forward`` is the inference path: the student's logits of every image,
    ``[N, 3, H, W] -> [N, 2]``, with positive probability ``softmax(logits)[:, 1]``. Training uses the parts
    separately (:class:`common.engines.bag_distillation.BagDistillationTrainer`).

    Args:
        arch: encoder architecture (``"resnet18"`` or ``"resnet50"``).
        pretrained_path: torchvision ImageNet checkpoint of the encoder (None: random initialisation).
        student_returns_features: the faithful student bug, see :class:`InstanceClassifierHead` (then ``forward``
            returns ``[N, 4096]``, whose ``softmax[:, 1]`` the original reads as the positive probability).
        dropout: dropout probability of all heads (0.5).
    """

    def __init__(self, arch: str = "resnet18", pretrained_path: str | os.PathLike | None = None,
                 student_returns_features: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        self.encoder = ResNetBagEncoder(arch, pretrained_path)
        dim = self.encoder.out_features
        self.teacher1 = AttentionMILHead(dim, dropout=dropout)
        self.teacher2 = DSMILHead(dim, dropout=dropout)
        self.student = InstanceClassifierHead(dim, dropout=dropout, returns_features=student_returns_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> student logits ``[N, 2]``."""
        return self.student(self.encoder(images))
