"""Episodic engines (specs/cdtg.md §3, §4.7): the K-shot vote by hand, real ignite runs on synthetic episodes, a
host's own training objective, per-episode test-time fine-tuning, K-shot hosts, the primed fine-tuning inferer.

Stand-in networks with the contract §2 call signature: ``PrototypeNet`` (learnable 1x1-conv embedding, logits =
scaled cosine of each query pixel to the support's bg / fg prototypes), ``SupportMaskNet`` (no parameters; its
1-shot prediction *is* the support mask, so the K-shot prediction is the vote of the support masks, known by hand),
and, further down, one-parameter hosts whose episode loss, fine-tuning and K-shot rule are computable by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.engines.episodic import EpisodicEvaluator, EpisodicTrainer, episode_batch, vote_shots
from common.engines.inferers import PrimedFinetuneInferer
from common.metrics.fewshot import FewShotIoUMetric
from common.networks.fewshot_host import PrimedSupport

pytestmark = pytest.mark.usefixtures("one_thread")


class PrototypeNet(nn.Module):
    """``logits[:, j](x) = 10 cos(E q(x), p_j)`` with ``p_0, p_1`` the masked average of ``E s`` over bg / fg."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 1)
        self.text_calls = 0

    def forward(self, q, s, m, class_text=None, background_text=None):
        if class_text is not None:
            self.text_calls += 1
            assert class_text.shape == background_text.shape == (q.shape[0], 5)
        fq, fs, w = self.embed(q), self.embed(s), m[:, None]
        fg = (fs * w).sum((2, 3)) / (w.sum((2, 3)) + 1e-6)
        bg = (fs * (1 - w)).sum((2, 3)) / ((1 - w).sum((2, 3)) + 1e-6)
        protos = torch.stack([bg, fg], dim=1)[..., None, None]  # [B, 2, C, 1, 1]
        return 10 * F.cosine_similarity(fq[:, None], protos, dim=2)


class SupportMaskNet(nn.Module):
    """Logits ``[1 - m, m]``: the arg-max is the support mask whatever the query."""

    def forward(self, q, s, m, class_text=None, background_text=None):
        return torch.stack([1 - m, m], dim=1)


def _cells(*cells: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(4, 4)
    for r, c in cells:
        m[r, c] = 1
    return m


def _rows(*rows: int) -> torch.Tensor:
    return _cells(*[(r, c) for r in rows for c in range(4)])


class ListDataset(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _episode(i: int, query_mask: torch.Tensor, support_masks: torch.Tensor, class_id: int,
             images: torch.Tensor | None = None, text: bool = False) -> dict:
    size = query_mask.shape[-1]
    k = support_masks.shape[0]
    images = torch.zeros(k + 1, 3, size, size) if images is None else images
    item = {"query_image": images[0], "query_mask": query_mask, "query_ignore": torch.zeros_like(query_mask),
            "support_images": images[1:], "support_masks": support_masks, "class_id": class_id,
            "class_name": f"class{class_id}", "query_name": f"q{i}", "episode": i}
    if text:
        item.update(class_text=torch.full((5,), float(class_id)), background_text=torch.zeros(5))
    return item


# Episode A (class 0), supports s1 = rows 0-1, s2 = row 0, s3 = rows 0-2 x cols 0-1. Votes V = s1 + s2 + s3:
#   row 0: 3 3 2 2 | row 1: 2 2 1 1 | row 2: 1 1 0 0 | row 3: 0 0 0 0;  max V = 3 -> keep V / 3 >= 0.5 <=> V >= 2
#   P = row 0 + (1, 0), (1, 1) (6 px); G = rows 0-1 (8 px): fg I = 6, U = 8; bg P0 = 10, G0 = 8, I = 8, U = 10
# Episode B (class 1), supports s1 = {(3,3)}, s2 = {(3,3), (3,2)}, s3 = {(0,0)}: V(3,3) = 2, V(3,2) = V(0,0) = 1,
#   max V = 2 -> V >= 1: P = {(3,3), (3,2), (0,0)} (normalising by K = 3 would keep only (3,3))
#   G = row 3 (4 px): fg I = 2, U = 4 + 3 - 2 = 5; bg P0 = 13, G0 = 12, I = 11, U = 14
SUPPORTS_A = torch.stack([_rows(0, 1), _rows(0), _cells(*[(r, c) for r in range(3) for c in range(2)])])
SUPPORTS_B = torch.stack([_cells((3, 3)), _cells((3, 3), (3, 2)), _cells((0, 0))])
VOTE_A = _cells(*[(0, c) for c in range(4)], (1, 0), (1, 1))
VOTE_B = _cells((3, 3), (3, 2), (0, 0))


def test_vote_shots_by_hand() -> None:
    votes = vote_shots(torch.stack([SUPPORTS_A, SUPPORTS_B], dim=1).long())  # [K=3, B=2, 4, 4]
    assert votes.dtype == torch.long
    assert torch.equal(votes, torch.stack([VOTE_A, VOTE_B]).long())
    one = SUPPORTS_A[:1, None].long()  # K = 1, B = 1: the mask itself
    assert torch.equal(vote_shots(one), one[0])
    assert not vote_shots(torch.zeros(2, 1, 4, 4, dtype=torch.long)).any()  # no vote: max(0, 1) keeps nothing
    with pytest.raises(ValueError, match="K, B, H, W"):
        vote_shots(torch.zeros(1, 4, 4))


def _hand_episodes(text: bool = False) -> list[dict]:
    return [_episode(0, _rows(0, 1), SUPPORTS_A, 0, text=text), _episode(1, _rows(3), SUPPORTS_B, 1, text=text)]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluator_metrics_by_hand(batch_size: int) -> None:
    loader = DataLoader(ListDataset(_hand_episodes()), batch_size=batch_size)
    evaluator = EpisodicEvaluator("cpu", loader, SupportMaskNet(),
                                  key_val_metric={"miou": FewShotIoUMetric(2, "miou")},
                                  additional_metrics={"fbiou": FewShotIoUMetric(2, "fbiou")})
    preds = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"]))
    evaluator.run()
    assert torch.equal(torch.cat(preds), torch.stack([VOTE_A, VOTE_B]).long())
    # mIoU = 100 (6/8 + 2/5) / 2 = 57.5; FB-IoU = 100 (fg 8/13 + bg 19/24) / 2
    assert evaluator.state.metrics["miou"] == pytest.approx(57.5)
    assert evaluator.state.metrics["fbiou"] == pytest.approx(100 * (8 / 13 + 19 / 24) / 2)
    out = evaluator.state.output
    assert set(out) >= {"image", "support_images", "support_masks", "label", "pred", "class_id", "ignore"}
    assert out["support_images"].shape[1] == 3 and out["label"].dtype == torch.long


def _colour_episodes(n: int, shot: int, text: bool, seed: int = 0) -> list[dict]:
    """8x8 episodes: a random rectangle of colour (0.5, 0.2, 0.9) on (0.5, 0.2, 0.1), plus noise."""
    g = torch.Generator().manual_seed(seed)
    fg, bg = torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.5, 0.2, 0.1])
    items = []
    for i in range(n):
        masks = torch.zeros(shot + 1, 8, 8)
        for j in range(shot + 1):
            r, c = torch.randint(0, 5, (2,), generator=g).tolist()
            masks[j, r:r + 3, c:c + 3] = 1
        images = torch.where(masks[:, None].bool(), fg[:, None, None], bg[:, None, None])
        images = images + 0.05 * torch.randn(images.shape, generator=g)
        items.append(_episode(i, masks[0], masks[1:], i % 2, images, text))
    return items


def test_trainer_reduces_the_loss_and_passes_text() -> None:
    torch.manual_seed(0)
    net = PrototypeNet()
    loader = DataLoader(ListDataset(_colour_episodes(8, 1, text=True)), batch_size=4)
    trainer = EpisodicTrainer("cpu", 15, loader, net, torch.optim.Adam(net.parameters(), lr=0.05),
                              key_train_metric={"train_miou": FewShotIoUMetric(2, "miou")})
    events: list[str] = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                  IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda e, name=event.name: events.append(name))
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    assert events[:4] == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"]
    assert len(losses) == 30 and net.text_calls == 30  # text given to every forward
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.5 * first, (first, last)
    out = trainer.state.output
    assert out["pred"].shape == (4, 8, 8) and out["pred"].dtype == torch.long and out["class_id"].shape == (4,)
    assert 0.0 <= trainer.state.metrics["train_miou"] <= 100.0


def test_evaluator_k_shot_with_learnt_network_and_text_only_when_present() -> None:
    torch.manual_seed(0)
    net = PrototypeNet()
    with torch.no_grad():  # an embedding that separates the two colours: channel 2 minus its mid-point
        net.embed.weight.zero_()
        net.embed.weight[0, 2] = 1.0
        net.embed.bias.copy_(torch.tensor([-0.5, 0.01, 0.0, 0.0]))
    for text in (False, True):
        loader = DataLoader(ListDataset(_colour_episodes(4, 5, text=text, seed=1)), batch_size=2)
        evaluator = EpisodicEvaluator("cpu", loader, net, key_val_metric={"miou": FewShotIoUMetric(2)})
        net.text_calls = 0
        evaluator.run()
        assert net.text_calls == (2 * 5 if text else 0)  # 2 batches x 5 shots, text only when the batch has it
        assert evaluator.state.metrics["miou"] == pytest.approx(100.0)  # colours are well apart: a perfect vote


def test_bad_batches() -> None:
    item = _hand_episodes(text=True)[0]
    batch = {k: (v[None] if isinstance(v, torch.Tensor) else torch.tensor([v]) if isinstance(v, int) else [v])
             for k, v in item.items()}
    assert episode_batch(batch, "cpu")["text"].keys() == {"class_text", "background_text"}
    with pytest.raises(ValueError, match="'support_masks'"):
        episode_batch({k: v for k, v in batch.items() if k != "support_masks"}, "cpu")
    with pytest.raises(ValueError, match="not the other"):
        episode_batch({k: v for k, v in batch.items() if k != "background_text"}, "cpu")
    with pytest.raises(ValueError, match="expected"):
        episode_batch({**batch, "query_mask": batch["query_mask"][:, :3]}, "cpu")

    class WrongSize(nn.Module):
        def forward(self, q, s, m, **_):
            return torch.zeros(q.shape[0], 2, 2, 2)

    evaluator = EpisodicEvaluator("cpu", [batch], WrongSize())
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        evaluator.run()


class ScaledMaskNet(nn.Module):
    """Logits ``w [1 - m, m]``: the support mask scaled by one parameter ``w`` (1 at the start); its own episode
    objective adds ``0.5 w^2`` to the cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.episode_calls = 0

    def forward(self, q, s, m, class_text=None, background_text=None):
        return self.w * torch.stack([1 - m, m], dim=1)

    def episode_loss(self, q, s, m, query_mask, class_text=None, background_text=None):
        self.episode_calls += 1
        logits = self(q, s, m)
        return F.cross_entropy(logits, query_mask) + 0.5 * self.w ** 2, logits


@pytest.mark.parametrize("explicit_loss", [False, True])
def test_trainer_uses_the_hosts_episode_loss(explicit_loss: bool) -> None:
    # one episode, query mask = support mask = rows 0-1: every pixel's correct class has logit w = 1, the other 0,
    # so CE = ln(1 + e^-1) = 0.313262 at every pixel and dCE/dw = -e^-1 / (1 + e^-1) = -0.268941.
    # episode loss: L = 0.313262 + 0.5 * 1^2 = 0.813262, dL/dw = -0.268941 + 1 = 0.731059 -> SGD 0.1: w = 0.926894
    # an explicit loss_function (CE) wins: L = 0.313262, w = 1 + 0.1 * 0.268941 = 1.026894
    net = ScaledMaskNet()
    loader = DataLoader(ListDataset([_episode(0, _rows(0, 1), _rows(0, 1)[None], 0)]), batch_size=1)
    trainer = EpisodicTrainer("cpu", 1, loader, net, torch.optim.SGD(net.parameters(), lr=0.1),
                              loss_function=nn.CrossEntropyLoss() if explicit_loss else None)
    assert trainer.uses_episode_loss is not explicit_loss
    trainer.run()
    loss, w = (0.313262, 1.026894) if explicit_loss else (0.813262, 0.926894)
    assert float(trainer.state.output["loss"]) == pytest.approx(loss, abs=1e-6)
    assert net.w.item() == pytest.approx(w, abs=1e-6)
    assert net.episode_calls == (0 if explicit_loss else 1)
    assert torch.equal(trainer.state.output["pred"], _rows(0, 1)[None].long())  # arg-max of w [1 - m, m]


class ShiftNet(nn.Module):
    """Logits ``[0, b]`` at every pixel (all foreground once ``b > 0``; ``b = 0`` ties go to the background).
    ``finetune`` records ``b`` and the supports' shape, leaves a gradient and adds ``steps`` to ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[float, tuple[int, ...]]] = []

    def forward(self, q, s, m, class_text=None, background_text=None):
        return torch.stack([torch.zeros_like(q[:, 0]), self.b.expand_as(q[:, 0])], dim=1)

    def finetune_parameters(self):
        return [("b", self.b)]

    def finetune(self, q, s, m, class_text=None, background_text=None, steps=1):
        self.seen.append((self.b.item(), tuple(s.shape)))
        with torch.enable_grad():
            (-self.b).backward()
        with torch.no_grad():
            self.b += steps
        return [0.0] * steps


@pytest.mark.parametrize("steps", [0, 2])
def test_evaluator_finetunes_per_batch_and_restores(steps: int) -> None:
    net = ShiftNet()
    loader = DataLoader(ListDataset(_hand_episodes()), batch_size=1)
    evaluator = EpisodicEvaluator("cpu", loader, net, finetune_steps=steps,
                                  key_val_metric={"miou": FewShotIoUMetric(2)})
    evaluator.run()
    # fine-tuned: b = 2 > 0 predicts everything foreground. A: G = rows 0-1, I = 8, U = 16 -> 1/2; B: G = row 3,
    # I = 4, U = 16 -> 1/4; mIoU = 100 (1/2 + 1/4) / 2 = 37.5. Without fine-tuning nothing is foreground: 0.
    assert evaluator.state.metrics["miou"] == pytest.approx(37.5 if steps else 0.0)
    # each batch started from the trained b = 0 with its K = 3 supports [B, K, 3, H, W]; b is back, without gradient
    assert net.seen == ([(0.0, (1, 3, 3, 4, 4))] * 2 if steps else [])
    assert net.b.item() == 0.0 and net.b.grad is None


def test_evaluator_refuses_finetuning_a_network_without_it() -> None:
    with pytest.raises(ValueError, match=r"finetune_steps=3, but SupportMaskNet has no test-time fine-tuning"):
        EpisodicEvaluator("cpu", [], SupportMaskNet(), finetune_steps=3)
    with pytest.raises(ValueError, match="integer >= 0"):
        EpisodicEvaluator("cpu", [], ShiftNet(), finetune_steps=-1)


class MeanMaskNet(nn.Module):
    """A host with its own K-shot rule (``kshot_forward``): foreground where the mean of the K support masks is
    above 1/2, in one call on ``[B, K, 3, H, W]`` supports."""

    kshot_forward = True

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, q, s, m, class_text=None, background_text=None):
        self.shapes.append(tuple(s.shape))
        mean = m.mean(dim=1)
        return torch.stack([torch.full_like(mean, 0.5), mean], dim=1)


def test_evaluator_calls_a_kshot_host_once_per_batch() -> None:
    net = MeanMaskNet()
    evaluator = EpisodicEvaluator("cpu", DataLoader(ListDataset(_hand_episodes()), batch_size=2), net)
    preds = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"]))
    evaluator.run()
    assert net.shapes == [(2, 3, 3, 4, 4)]  # one call with the K = 3 supports of both episodes
    # A: mean 1 or 2/3 on row 0 and (1, 0), (1, 1), 1/3 or 0 elsewhere -> the vote's mask; B: (3, 3) 2/3, (3, 2) and
    # (0, 0) 1/3 -> only (3, 3), where the vote (normalised by its maximum, 2) kept all three
    assert torch.equal(preds[0], torch.stack([VOTE_A, _cells((3, 3))]).long())


class PrimedShiftNet(PrimedSupport, ShiftNet):
    """:class:`ShiftNet` primed with a support set (the hosts' deployment mode)."""

    text_guide = None

    def __init__(self, support: dict) -> None:
        super().__init__()
        self._finish_init(None, support)

    def forward(self, q, s=None, m=None, class_text=None, background_text=None):
        if self._primed_call(s, m):
            return self._forward_primed(q)
        return super().forward(q, s, m)


def test_primed_finetune_inferer() -> None:
    support = {"support_images": torch.zeros(2, 3, 4, 4), "support_masks": torch.stack([_rows(0), _rows(1)])}
    net = PrimedShiftNet(support)
    query = torch.zeros(3, 3, 4, 4)
    # 2 steps: b = 2, both shots all foreground, the vote one-hot all foreground; then b is back to 0
    out = PrimedFinetuneInferer(steps=2)(query, net)
    assert torch.equal(out.argmax(dim=1), torch.ones(3, 4, 4, dtype=torch.long))
    assert net.seen == [(0.0, (3, 2, 3, 4, 4))] and net.b.item() == 0.0 and net.b.grad is None
    # 0 steps: the network as it is (SimpleInferer): b = 0, nothing foreground
    assert not PrimedFinetuneInferer()(query, net).argmax(dim=1).any() and len(net.seen) == 1
    with pytest.raises(ValueError, match="SupportMaskNet is not a few-shot host with a primed support set"):
        PrimedFinetuneInferer(steps=1)(query, SupportMaskNet())
    with pytest.raises(ValueError, match="integer >= 0"):
        PrimedFinetuneInferer(steps=-2)
