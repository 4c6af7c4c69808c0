"""Res2Net-50 v1b 26w×4s: the published size and strict loading of the official key names."""

import pytest
import torch

from common.networks.res2net import res2net50_v1b, res2net_stages


def test_published_parameter_count_and_stage_shapes():
    """Res2Net-50 26w×4s has 25.7 M parameters (Gao et al., TPAMI 2021, Table 2 / the official model zoo); the
    v1b deep stem (3·32·9 + 32·32·9 + 32·64·9 = 864 + 9,216 + 18,432 weights, + BN) gives exactly 25,718,352."""
    model = res2net50_v1b()
    assert sum(p.numel() for p in model.parameters()) == 25_718_352
    stages = res2net_stages(model.eval(), torch.rand(1, 3, 64, 96))
    assert [tuple(s.shape) for s in stages] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]


def test_official_key_names_load_strictly_and_mismatches_are_named(tmp_path):
    tiny = dict(layers=(1, 1, 1, 1), channels=(16, 16, 16, 16), stem_width=8)
    source = res2net50_v1b(**tiny)
    keys = source.state_dict().keys()
    assert {"conv1.0.weight", "conv1.6.weight", "bn1.weight", "layer1.0.convs.0.weight", "layer2.0.downsample.1.weight",
            "fc.weight"} <= set(keys)  # the names of res2net50_v1b_26w_4s-3cf99910.pth
    path = tmp_path / "res2net.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = res2net50_v1b(pretrained_path=path, **tiny)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    torch.save({k: v for k, v in source.state_dict().items() if k != "fc.bias"}, path)
    with pytest.raises(ValueError, match="fc.bias"):
        res2net50_v1b(pretrained_path=path, **tiny)


def test_every_batchnorm_starts_at_one_as_in_the_official_res2net():
    """timm zero-initialises each block's last BN by default; the official Res2Net (and PraNet's copy) does not."""
    model = res2net50_v1b(layers=(1, 1, 1, 1), channels=(16, 16, 16, 16), stem_width=8)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert weights and all(torch.all(w == 1) for w in weights)
