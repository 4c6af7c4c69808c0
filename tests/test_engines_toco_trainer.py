"""ToCoTrainer, the poly warm-up schedule / optimiser and the CAM predictor (specs/endoked.md §3.4, §3.6, §6).

The trainer runs the real tiny ToCoViT (embed 64, depth 3, 2 heads, small CTC heads) and the real PAR on random
224x224 batches of one positive and one negative image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.utils.data import DataLoader

import common.engines.optimiser_step as optimiser_step
import common.engines.toco_trainer as toco_trainer
from common.engines.toco_trainer import ToCoTrainer, cam_predictor
from common.networks.par import PAR
from common.networks.toco_vit import ToCoViT
from common.utils.poly_warmup import PolyWarmupLR, poly_warmup_factor, toco_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------------ schedule


def test_poly_warmup_factor_by_hand():
    # warm-up 1 - (1 - t/1500)(1 - 1e-6), then (1 - t/80000)^0.9
    assert poly_warmup_factor(0) == pytest.approx(1e-6)  # 1 - 1 * (1 - 1e-6)
    assert poly_warmup_factor(750) == pytest.approx(0.5000005, rel=1e-9)  # 1 - 0.5 * (1 - 1e-6)
    assert poly_warmup_factor(1500) == pytest.approx(0.98125 ** 0.9, rel=1e-9)  # 1 - 1500/80000 = 0.98125 -> 0.98311
    assert poly_warmup_factor(40750) == pytest.approx(0.490625 ** 0.9, rel=1e-9)  # 39250/80000 -> 0.52686
    assert poly_warmup_factor(80000) == 0.0
    assert poly_warmup_factor(90000) == 0.0  # past T: stays 0
    with pytest.raises(ValueError, match="step must be >= 0"):
        poly_warmup_factor(-1)
    with pytest.raises(ValueError, match="warmup_iters"):
        poly_warmup_factor(0, warmup_iters=10, max_iters=5)


class FourGroups(nn.Module):
    """Network double with ToCoViT's ``param_groups()`` contract (one scalar per group)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(4)])

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [[p] for p in self.p]


def test_toco_optimizer_groups_and_poly_warmup_lr_by_hand():
    optimizer = toco_optimizer(FourGroups(), lr=1.0, weight_decay=0.5, betas=(0.8, 0.9))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0, 10.0, 10.0]
    assert all(g["weight_decay"] == 0.5 and g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)
    # W = 2, T = 4, r = 0.5, power 1: f = 1 - (1 - 0/2) * 0.5 = 0.5, 1 - (1 - 1/2) * 0.5 = 0.75, then
    # 1 - 2/4 = 0.5, 1 - 3/4 = 0.25, 0
    scheduler = PolyWarmupLR(optimizer, warmup_iters=2, max_iters=4, warmup_ratio=0.5, power=1.0)
    seen = []
    for _ in range(5):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [[f, f, 10 * f, 10 * f] for f in (0.5, 0.75, 0.5, 0.25, 0.0)]
    assert np.allclose(seen, expected)
    with pytest.raises(ValueError, match="has no param_groups"):
        toco_optimizer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="returned 4 groups"):
        toco_optimizer(FourGroups(), lr_multipliers=(1.0, 10.0))


# ------------------------------------------------------------------------------------------------ trainer

SIZE = 224


def tiny_toco() -> ToCoViT:
    torch.manual_seed(0)
    return ToCoViT(embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0, proj_hidden_dim=64, proj_bottleneck_dim=32,
                   proj_out_dim=64)


def batches(n: int = 1) -> DataLoader:
    """Samples of one positive and one negative image; batches of 2."""
    g = torch.Generator().manual_seed(1)
    samples = [{"image": torch.randn(3, SIZE, SIZE, generator=g), "image_raw": torch.rand(3, SIZE, SIZE, generator=g),
                "global_view": torch.randn(3, SIZE, SIZE, generator=g),
                "local_image": torch.randn(3, SIZE, SIZE, generator=g),
                "label": torch.tensor([float(i % 2 == 0)])} for i in range(2 * n)]
    return DataLoader(samples, batch_size=2)


def make_trainer(network: ToCoViT, max_epochs: int, data: DataLoader | None = None, **kwargs) -> ToCoTrainer:
    optimizer = toco_optimizer(network, lr=1e-3)
    kwargs.setdefault("lr_scheduler", PolyWarmupLR(optimizer, warmup_iters=2, max_iters=4, warmup_ratio=0.5,
                                                   power=1.0))
    return ToCoTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data or batches(),
                       network=network, optimizer=optimizer, par=PAR(num_iter=2), cam_scales=(1.0, 0.5),
                       crop_num=2, crop_size=64, crop_margin=32, **kwargs)


def test_trainer_crosses_seg_warmup_and_aux_to_main_switch(monkeypatch):
    network = tiny_toco()
    cams_seen, refined_from = [], []
    real_msc, real_refine = toco_trainer.multi_scale_cam, toco_trainer.refine_cams_with_par

    def spy_msc(*args, **kwargs):
        out = real_msc(*args, **kwargs)
        cams_seen.append(out)
        return out

    def spy_refine(par, images01, cams, *args, **kwargs):
        refined_from.append(cams.clone())
        return real_refine(par, images01, cams, *args, **kwargs)

    monkeypatch.setattr(toco_trainer, "multi_scale_cam", spy_msc)
    monkeypatch.setattr(toco_trainer, "refine_cams_with_par", spy_refine)
    trainer = make_trainer(network, max_epochs=4, seg_warmup_iters=1, aux_to_main_iter=3, w_ctc=0.1)
    start = {k: v.clone() for k, v in network.state_dict().items()}
    records = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        records.append((dict(engine.state.output), network.decoder.c0.weight.detach().clone()))

    trainer.run()
    assert len(records) == 4
    terms = ("loss", "loss_cls", "loss_cls_aux", "loss_ptc", "loss_ctc", "loss_seg", "loss_dice")
    for output, _ in records:
        assert all(torch.isfinite(output[k]) and output[k].ndim == 0 for k in terms)
        assert output["flags"].shape == (2, 4) and output["cam_label"].shape == (2, SIZE, SIZE)
        assert output["pred"].shape == (2, 1) and not output["loss"].requires_grad
    # n = 0, 1 <= seg_warmup_iters: no segmentation terms, PAR not run, decoder (only reached by them) untouched
    for output, decoder in records[:2]:
        assert output["loss_seg"] == 0 and output["loss_dice"] == 0 and "pseudo_label" not in output
        assert torch.equal(decoder, start["decoder.c0.weight"])
    # n = 2, 3 > 1: segmentation terms on, refined labels in {0, 1, 255}, the decoder learns
    for output, _ in records[2:]:
        assert output["loss_dice"] > 0 and output["pseudo_label"].shape == (2, SIZE, SIZE)
        assert set(output["pseudo_label"].unique().tolist()) <= {0, 1, 255}
        assert (output["pseudo_label"][1] == 0).all()  # the negative image is background
    assert not torch.equal(records[3][1], start["decoder.c0.weight"])
    # total = cls + cls_aux + 0.2 ptc + 0.1 ctc (+ 0.1 seg + 0.1 dice from n = 2)
    out = records[3][0]
    total = out["loss_cls"] + out["loss_cls_aux"] + 0.2 * out["loss_ptc"] + 0.1 * out["loss_ctc"] \
        + 0.1 * out["loss_seg"] + 0.1 * out["loss_dice"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    # n = 2 < aux_to_main_iter = 3 refines the aux CAM, n = 3 the main CAM (positive image kept, negative zeroed)
    assert len(refined_from) == 2
    (_, aux2), (cam3, aux3) = cams_seen[2], cams_seen[3]
    assert torch.equal(refined_from[0][0], aux2[0]) and refined_from[0][1].abs().sum() == 0
    assert torch.equal(refined_from[1][0], cam3[0]) and not torch.equal(refined_from[1][0], aux3[0])
    # lr of step n = 1e-3 * f(n): f = 0.5, 0.75, 0.5, 0.25 (W = 2, T = 4, r = 0.5, power 1)
    assert [o["lr"] for o, _ in records] == pytest.approx([5e-4, 7.5e-4, 5e-4, 2.5e-4])
    assert trainer.optimizer.param_groups[2]["lr"] == pytest.approx(0.0)  # after the 4th step: f(4) = 0
    # weights changed: classifier and student head by the optimiser, teacher head by EMA
    for key in ("classifier.weight", "encoder.blocks.0.attn.qkv.weight", "proj_head.mlp.0.weight"):
        assert not torch.equal(network.state_dict()[key], start[key]), key
    assert not torch.equal(network.state_dict()["proj_head_t.mlp.0.weight"], start["proj_head_t.mlp.0.weight"])

    # the CAM predictor of the trained network: native size, float32 in [0, 1]
    predict = cam_predictor(network, scales=(1.0, 0.5), size=SIZE)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    cam = predict(image)
    assert cam.shape == (60, 80) and cam.dtype == np.float32 and 0.0 <= cam.min() and cam.max() <= 1.0
    assert network.training  # its mode is given back


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_trainer_amp_path_runs_through_the_grad_scaler():
    # amp=True: the step goes through engine.scaler (a disabled GradScaler without CUDA) and autocast
    network = tiny_toco()
    trainer = make_trainer(network, max_epochs=2, amp=True, seg_warmup_iters=0)
    before = network.classifier.weight.detach().clone()
    trainer.run()
    assert trainer.scaler is not None
    # the second step (n = 1 > 0) includes the segmentation terms
    assert torch.isfinite(trainer.state.output["loss"]) and "pseudo_label" in trainer.state.output
    assert not torch.equal(network.classifier.weight, before)


def test_trainer_refuses_missing_views_and_bad_arguments():
    network = tiny_toco()
    data = [{"image": torch.randn(3, SIZE, SIZE), "label": torch.tensor([1.0])}]
    trainer = make_trainer(network, max_epochs=1, data=DataLoader(data, batch_size=1))
    with pytest.raises(ValueError, match="no 'image_raw' entry"):
        trainer.run()
    with pytest.raises(ValueError, match="low <= high"):
        make_trainer(network, max_epochs=1, high=0.2, low=0.5)
    with pytest.raises(ValueError, match="loss weights"):
        make_trainer(network, max_epochs=1, w_seg=-1.0)


# ------------------------------------------------------------------------------------------------ CAM predictor


class RedCAM(nn.Module):
    """``cam = cam_aux = red channel`` of the (normalised) input; records the mode and the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[bool, tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor, cam_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((self.training, tuple(x.shape)))
        return x[:, :1], x[:, :1]


def test_cam_predictor_by_hand():
    # 2x4 RGB image, red 0 on the left half and 255 on the right (columns constant over rows):
    # normalised red = (0 - .485)/.229 = -2.118 and (1 - .485)/.229 = 2.249; resized to 4x4 the columns stay
    # [-2.118, -2.118, 2.249, 2.249]; the image is not flip-symmetric but the flipped-back CAM equals the original
    # one, ReLU -> [0, 0, 2.249, 2.249], min-max -> [0, 0, 2.249/(2.249 + 1e-5), same] ~ [0, 0, 1, 1];
    # back to 2x4 (rows constant, columns unchanged): [[0, 0, 1, 1], [0, 0, 1, 1]]
    image = np.zeros((2, 4, 3), dtype=np.uint8)
    image[:, 2:, 0] = 255
    model = RedCAM()
    cam = cam_predictor(model, scales=(1.0,), size=4)(image)
    red = (1 - 0.485) / 0.229
    expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=np.float32) * red / (red + 1e-5)
    assert cam.dtype == np.float32 and cam.shape == (2, 4)
    assert np.allclose(cam, expected, atol=1e-6)
    assert model.calls == [(False, (2, 3, 4, 4))]  # eval mode, [x; hflip x] at 4x4
    assert model.training  # mode given back
    with pytest.raises(ValueError, match="uint8 RGB"):
        cam_predictor(model, size=4)(image.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        cam_predictor(model, size=4)(image[..., 0])


# ------------------------------------------------------------------------------------------------ two processes

DIST_SIZE = 64


def _dist_worker(rank: int, store: str, results: dict) -> None:
    """One ToCo step on rank ``rank`` of a 2-process gloo group: the ranks start from different weights and see
    different batches; the spy records each rank's own gradient before it is averaged."""
    import torch.distributed as dist
    from monai.engines.utils import IterationEvents

    torch.set_num_threads(1)
    real_average = optimiser_step.average_gradients
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(10 + rank)  # different initial weights on the two ranks
        network = ToCoViT(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, proj_hidden_dim=32,
                          proj_bottleneck_dim=16, proj_out_dim=32)
        before = {k: v.clone() for k, v in network.state_dict().items()}
        g = torch.Generator().manual_seed(100 + rank)  # different data on the two ranks
        data = [{"image": torch.randn(3, DIST_SIZE, DIST_SIZE, generator=g),
                 "image_raw": torch.rand(3, DIST_SIZE, DIST_SIZE, generator=g),
                 "global_view": torch.randn(3, DIST_SIZE, DIST_SIZE, generator=g),
                 "local_image": torch.randn(3, DIST_SIZE, DIST_SIZE, generator=g),
                 "label": torch.tensor([float(i == 0)])} for i in range(2)]
        local_grads = []

        def spy_average(parameters):
            parameters = list(parameters)
            local_grads.append(network.classifier.weight.grad.clone())
            real_average(parameters)

        optimiser_step.average_gradients = spy_average
        optimizer = toco_optimizer(network, lr=1e-3)
        trainer = ToCoTrainer(device=torch.device("cpu"), max_epochs=1, network=network, optimizer=optimizer,
                              train_data_loader=DataLoader(data, batch_size=2), par=PAR(num_iter=1),
                              cam_scales=(1.0,), crop_num=2, crop_size=32, crop_margin=16, seed=rank)
        out = {"before": before}
        trainer.add_event_handler(Events.STARTED, lambda e: out.update(
            started={k: v.clone() for k, v in network.state_dict().items()}))
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: out.update(
            grad=network.classifier.weight.grad.clone()))
        trainer.run()
        out.update(local_grad=local_grads[0], loss=trainer.state.output["loss"].item(),
                   after={k: v.clone() for k, v in network.state_dict().items()})
        results[rank] = out
    finally:
        optimiser_step.average_gradients = real_average
        dist.destroy_process_group()


def test_two_processes_start_from_rank0_and_step_with_averaged_gradients(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    key = "classifier.weight"
    assert not torch.equal(r0["before"][key], r1["before"][key])  # seeds 10 and 11: different initial weights
    for name, value in r0["before"].items():  # at STARTED both ranks hold rank 0's initial weights
        assert torch.equal(r0["started"][name], value) and torch.equal(r1["started"][name], value), name
    assert r0["loss"] != r1["loss"] and not torch.equal(r0["local_grad"], r1["local_grad"])  # different batches
    # the gradient the optimiser uses is the mean of the two local ones, g = (g_0 + g_1) / 2, on both ranks
    mean = (r0["local_grad"] + r1["local_grad"]) / 2
    assert torch.allclose(r0["grad"], mean, atol=1e-7) and torch.allclose(r1["grad"], mean, atol=1e-7)
    for name, value in r0["after"].items():  # same start, same gradients, same step: the ranks stay equal
        assert torch.equal(r1["after"][name], value), name
    assert not torch.equal(r0["after"][key], r0["before"][key])  # and the step did change the weights
