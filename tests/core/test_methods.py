import numpy as np
import pytest
import torch

from amlp_core.config import MethodConfig
from amlp_core.data import make_phantom_samples
from amlp_core.errors import ConfigError
from amlp_core.methods import METHODS, PretrainMethod, build_method, register_method
from tests.conftest import tiny_model


def _phantom_batch(cfg, n=8, seed=0):
    return torch.tensor(np.stack([s.image for s in make_phantom_samples(n, cfg.img_size, seed=seed)]))


def test_registry_has_the_seed_methods():
    assert {"mae", "mps_ams", "amlp"} <= set(METHODS)
    with pytest.raises(ValueError, match="registered twice"):
        register_method("mae")(type("Again", (PretrainMethod,), {}))


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="method.name='simclr'"):
        MethodConfig(name="simclr")


@pytest.mark.parametrize("name", ["mae", "mps_ams", "amlp"])
def test_step_forward_backward(name, dims):
    cfg = tiny_model(dims)
    method = build_method(cfg, MethodConfig(name=name))
    images = _phantom_batch(cfg, n=4)
    out = method.training_step(images, progress=0.5, generator=torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in method.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert out.mask.masked.shape == (4, cfg.num_patches)
    expected_ratio = 0.75 if name == "mae" else 0.5  # AMR midpoint between 0.25 and 0.75
    assert out.metrics["ratio"] == pytest.approx(expected_ratio, abs=1 / cfg.num_patches)
    if name == "amlp":
        assert out.metrics["ccl"] > 0 and out.metrics["loss"] > out.metrics["rec"]


@pytest.mark.parametrize("name", ["mps_ams", "amlp"])
def test_mps_may_cluster_the_encoders_tokens_on_the_whole_image(name):
    """method.mps_features=tokens: the patches are described by the encoder's tokens on the unmasked image
    (a second forward pass); AMLP's CCL then reaches the transformer through them, MPS-AMS's stays off."""
    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name=name, mps_features="tokens", mps_proj_dim=8))
    images = _phantom_batch(cfg, n=3)
    description = method.describe_patches(images, method.encoder.first_conv(images))
    assert description.shape == (3, cfg.num_patches, cfg.embed_dim)
    assert method.mps.features(description, images, cfg.patch_size).shape == (3, cfg.num_patches, 8 + 2)
    out = method.training_step(images, progress=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    plain = build_method(cfg, MethodConfig(name=name))  # the same weights, the stem's description
    plain.load_state_dict(method.state_dict(), strict=False)
    assert plain.mps.features(
        plain.describe_patches(images, plain.encoder.first_conv(images)), images, cfg.patch_size
    ).shape == (3, cfg.num_patches, cfg.conv_channels[0] + 2)
    if name == "amlp":  # CCL's gradient through the unmasked pass: the last block learns from it too
        method.zero_grad()
        ccl = method.extra_loss(*_ccl_inputs(method, images))[0]
        ccl.backward()
        assert method.encoder.blocks[-1].mlp[0].weight.grad.abs().sum() > 0


def _ccl_inputs(method, images):
    g = torch.Generator().manual_seed(0)
    first = method.encoder.first_conv(images)
    feats = method.mps.features(method.describe_patches(images, first), images, method.model_cfg.patch_size)
    clustering = method.mps.cluster(feats.detach(), g)
    mask = method.mps.select(clustering, 0.5, g)
    l_masked = torch.rand(mask.ids_masked.shape)
    return feats, clustering, method.mps.lesion_rank, mask, l_masked


def test_amr_drives_the_masking_ratio():
    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name="amlp", amr_start=0.2, amr_end=0.8))
    images = _phantom_batch(cfg, n=2)
    ratios = [method.training_step(images, t).metrics["ratio"] for t in (0.0, 0.5, 1.0)]
    assert ratios == pytest.approx([0.2, 0.5, 0.8], abs=1 / cfg.num_patches)


def test_shared_state_is_the_encoder_only():
    cfg = tiny_model(2)
    shared = build_method(cfg, MethodConfig(name="amlp")).shared_state_dict()
    assert shared and all(k.startswith("encoder.") for k in shared)


@pytest.mark.parametrize("name", ["mae", "amlp"])
def test_loss_decreases_on_phantoms(name):
    torch.manual_seed(0)
    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name=name, ccl_weight=0.1))
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    images = _phantom_batch(cfg, n=16, seed=1)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(40):
        out = method.training_step(images, progress=1.0, generator=g)  # fixed ratio for a fair curve
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics["rec"])
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
