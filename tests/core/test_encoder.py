"""The hierarchical encoder: the mask is honoured at every scale, and every method trains all of it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from amlp_core.config import METHOD_NAMES, MethodConfig
from amlp_core.masking import random_mask
from amlp_core.methods import build_method
from amlp_core.models import HybridEncoder, masked_instance_norm, visible_map
from tests.conftest import tiny_model


def _images(cfg, b=2, seed=0):
    return torch.randn(b, cfg.in_channels, *cfg.img_size, generator=torch.Generator().manual_seed(seed))


def _change_hidden_voxels(cfg, images, mask, seed=1):
    """``images`` with every voxel of a hidden patch replaced by other values (visible voxels untouched)."""
    vis = visible_map(~mask.masked, cfg.grid_size, cfg.img_size)  # [B, 1, *S]
    other = 5 * _images(cfg, images.shape[0], seed) + 3
    changed = images * vis + other * (1 - vis)
    assert not torch.equal(changed, images)
    return changed


def test_hidden_voxels_do_not_reach_visible_features(dims):
    """Change only masked voxels: every scale's features and the ViT's tokens stay the same."""
    cfg = tiny_model(dims)
    enc = HybridEncoder(cfg).eval()
    x = _images(cfg)
    mask = random_mask(2, cfg.num_patches, 0.5, torch.Generator().manual_seed(0))
    y = _change_hidden_voxels(cfg, x, mask)
    a = enc(x, visible=~mask.masked, ids_keep=mask.ids_keep)
    b = enc(y, visible=~mask.masked, ids_keep=mask.ids_keep)
    for level, (fa, fb) in enumerate(zip(a.skips, b.skips)):
        assert torch.allclose(fa, fb, atol=1e-5), f"stage {level + 1} leaks hidden voxels"
        hidden = visible_map(mask.masked, cfg.grid_size, tuple(fa.shape[2:])).expand_as(fa) > 0
        assert bool((fa[hidden] == 0).all()), f"stage {level + 1} has non-zero features at hidden positions"
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5)
    # The control: without the mask the same change does move the features (the test can fail).
    assert not torch.allclose(enc(x).tokens, enc(y).tokens, atol=1e-3)


@pytest.mark.parametrize(
    "name, decoder",
    [("mae", "transformer"), ("amlp", "transformer"), ("ahm", "transformer"), ("mae", "unet"), ("amlp", "unet")],
)
def test_prediction_and_loss_ignore_hidden_voxels(name, decoder, dims):
    """A masked method's prediction, hence its loss against the same target, ignores hidden voxels,
    with either pretraining decoder (SparK's reads every scale's visible features)."""
    cfg = dataclasses.replace(tiny_model(dims), pretrain_decoder=decoder)
    method = build_method(cfg, MethodConfig(name=name)).eval()
    x = _images(cfg)
    mask = random_mask(2, cfg.num_patches, 0.75, torch.Generator().manual_seed(0))
    y = _change_hidden_voxels(cfg, x, mask)
    with torch.no_grad():
        pa, pb = method.predict_patches(x, mask), method.predict_patches(y, mask)
        target = method.patchify(x)
        la = F.mse_loss(pa, target)
        lb = F.mse_loss(pb, target)
    assert torch.allclose(pa, pb, atol=1e-5)
    assert torch.allclose(la, lb, atol=1e-6)


def test_masked_norm_uses_visible_positions_only():
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(masked_instance_norm(x, None), F.instance_norm(x, eps=1e-5), atol=1e-6)
    vis = torch.zeros(2, 1, 8, 8)
    vis[:, :, :4] = 1
    out = masked_instance_norm(x + 10 * (1 - vis), vis)  # a large offset in the hidden half changes nothing
    assert torch.allclose(out, masked_instance_norm(x, vis), atol=1e-5)
    visible = out[:, :, :4]
    assert torch.allclose(visible.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(visible.var(dim=(2, 3), unbiased=False), torch.ones(2, 3), atol=1e-3)
    assert bool((out[:, :, 4:] == 0).all())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_trains_the_whole_encoder(name, dims):
    """Each pretraining method's loss reaches every encoder parameter: the conv stages, the patch
    embedding and the transformer (nothing the segmentation network uses is left untrained)."""
    cfg = tiny_model(dims)
    method = build_method(cfg, MethodConfig(name=name))
    out = method.training_step(_images(cfg, b=4), 0.5, torch.Generator().manual_seed(0))
    out.loss.backward()
    untouched = [
        n
        for n, p in method.encoder.named_parameters()
        if p.requires_grad and (p.grad is None or float(p.grad.abs().sum()) == 0)
    ]
    assert not untouched, f"{name} leaves encoder parameters untrained: {untouched[:5]}"
    assert {n.split(".")[0] for n, _ in method.encoder.named_parameters()} >= {"stages", "patch_embed", "blocks"}


def test_encoder_is_hierarchical(dims):
    """Skips at 1/2, 1/4 (the tiny model's two stages) and tokens on the patch grid."""
    cfg = tiny_model(dims)
    out = HybridEncoder(cfg)(_images(cfg))
    for i, (skip, width) in enumerate(zip(out.skips, cfg.conv_channels)):
        assert skip.shape == (2, width, *[s // 2 ** (i + 1) for s in cfg.img_size])
    assert out.tokens.shape == (2, cfg.num_patches, cfg.embed_dim)


def test_the_shared_first_conv_gives_the_masked_pass_exactly(dims):
    """MPS computes the first conv once on the unmasked image and hands it to the masked pass: the same result."""
    cfg = tiny_model(dims)
    enc = HybridEncoder(cfg).eval()
    x = _images(cfg)
    mask = random_mask(2, cfg.num_patches, 0.5, torch.Generator().manual_seed(0))
    plain = enc(x, ~mask.masked, mask.ids_keep)
    shared = enc(x, ~mask.masked, mask.ids_keep, first=enc.first_conv(x))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain.skips, shared.skips))
    assert torch.allclose(plain.tokens, shared.tokens, atol=1e-6)
