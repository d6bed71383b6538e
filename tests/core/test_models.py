import dataclasses

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from amlp_core.config import ARCHITECTURE, MethodConfig
from amlp_core.masking import random_mask
from amlp_core.methods import build_method
from amlp_core.models import (
    HybridEncoder,
    SegmentationNet,
    build_pretrain_decoder,
    build_segmentation_model,
    patchify,
    unpatchify,
)
from tests.conftest import tiny_model


def _images(cfg, b=2, seed=0):
    return torch.randn(b, cfg.in_channels, *cfg.img_size, generator=torch.Generator().manual_seed(seed))


def test_patchify_round_trip_and_matches_token_order(dims):
    cfg = tiny_model(dims)
    x = _images(cfg)
    patches = patchify(x, cfg.patch_size)  # [B, N, P]
    assert patches.shape == (2, cfg.num_patches, cfg.patch_size**dims)
    assert torch.equal(unpatchify(patches, cfg.patch_size, cfg.grid_size, 1), x)
    # The encoder's tokens follow the same order: a token changes when (and only when) its own patch is
    # the one hidden, since hidden patches are zeroed at every scale.
    enc = HybridEncoder(cfg).eval()
    visible = torch.ones(2, cfg.num_patches, dtype=torch.bool)
    visible[:, 3] = False
    full = enc(x).tokens
    masked = enc(x, visible=visible).tokens
    changed = (full - masked).abs().amax(-1)  # [B, N]
    assert bool((changed[:, 3] > 1e-4).all())


@pytest.mark.parametrize("decoder", ["transformer", "unet"])
def test_encoder_and_pretrain_decoder_shapes_and_backward(dims, decoder):
    """Both pretraining decoders predict every patch and train the encoder's every scale."""
    cfg = dataclasses.replace(tiny_model(dims), pretrain_decoder=decoder)
    enc, dec = HybridEncoder(cfg), build_pretrain_decoder(cfg)
    x = _images(cfg)
    mask = random_mask(2, cfg.num_patches, 0.75)
    features = enc(x, visible=~mask.masked, ids_keep=mask.ids_keep)
    assert features.tokens.shape == (2, mask.ids_keep.shape[1], cfg.embed_dim)
    pred = dec(features, mask)
    assert pred.shape == (2, cfg.num_patches, cfg.patch_size**dims)
    pred.pow(2).mean().backward()
    assert enc.patch_embed.weight.grad is not None and enc.patch_embed.weight.grad.abs().sum() > 0
    assert dec.mask_token.weight.grad is not None and dec.mask_token.weight.grad.abs().sum() > 0
    if decoder == "unet":  # the skips reach the loss directly, and the fills where patches are hidden
        assert all(f.weight.grad is not None and f.weight.grad.abs().sum() > 0 for f in dec.fills)


def test_segmentation_shapes_and_backward(dims):
    cfg = tiny_model(dims)
    net = SegmentationNet(cfg)
    x = _images(cfg)
    logits = net(x)
    assert logits.shape == (2, cfg.num_classes, *cfg.img_size)
    logits.mean().backward()
    assert all(p.grad is not None for p in net.encoder.parameters() if p.requires_grad)


def test_wrong_input_shape_is_refused(dims):
    cfg = tiny_model(dims)
    enc = HybridEncoder(cfg)
    bad = torch.zeros(1, 1, *[s + 4 for s in cfg.img_size])
    try:
        enc(bad)
    except ValueError as e:
        assert "encoder expects images of shape" in str(e)
    else:
        raise AssertionError("a wrongly sized image was accepted")


def test_strict_encoder_hand_off_from_pretraining(dims):
    """The segmentation network takes the pretraining encoder's weights with strict=True, no renaming."""
    cfg = tiny_model(dims)
    method = build_method(cfg, MethodConfig(name="amlp"))
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(0.1)
    encoder_state = {k.removeprefix("encoder."): v for k, v in method.state_dict().items() if k.startswith("encoder.")}
    net = SegmentationNet(cfg)
    missing = net.encoder.load_state_dict(encoder_state, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = _images(cfg)
    method.eval(), net.eval()
    assert torch.allclose(method.encoder(x).tokens, net.encoder(x).tokens)
    for a, b in zip(method.encoder(x).skips, net.encoder(x).skips):
        assert torch.allclose(a, b)
    # The segmentation net's encoder keys are exactly the pretraining encoder's, prefixed.
    seg_keys = {k.removeprefix("encoder.") for k in net.state_dict() if k.startswith("encoder.")}
    assert seg_keys == set(encoder_state)


@pytest.mark.parametrize("arch, cls", [("vit", SegmentationNet), ("unet", UNet)])
def test_segmentation_factory_builds_either_network(arch, cls, dims):
    """``model.seg_arch`` picks the network; both map [B, C, *S] to [B, K, *S] in 2D and 3D."""
    cfg = dataclasses.replace(tiny_model(dims), seg_arch=arch)
    net = build_segmentation_model(cfg)
    assert type(net) is cls
    x = _images(cfg)
    logits = net(x)
    assert logits.shape == (2, cfg.num_classes, *cfg.img_size)
    logits.mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # Opacus needs none
    has_encoder = any(k.startswith("encoder.") for k in net.state_dict())
    assert has_encoder == (arch == "vit")


def test_checkpoint_of_the_previous_layout_is_refused(tmp_path):
    """A pretraining or segmentation checkpoint written before the hierarchical encoder (layout 1, no
    ``architecture`` tag) is refused with a message naming the file and the mismatch."""
    from amlp_core.engine.artefacts import load_pretrained_encoder, load_segmentation, pretrained_meta
    from amlp_core.engine.checkpoint import save_checkpoint
    from amlp_core.errors import CheckpointError
    from tests.conftest import tiny_config

    cfg = tiny_config(2)
    method = build_method(cfg.model, cfg.method)
    meta = pretrained_meta(cfg, 1)
    good = save_checkpoint(tmp_path / "good.pt", {"method": method.state_dict()}, meta)
    encoder, _ = load_pretrained_encoder(good, cfg.model)
    assert set(encoder) == set(method.encoder.state_dict())
    old = {k: v for k, v in meta.items() if k != "architecture"}
    old_path = save_checkpoint(tmp_path / "old.pt", {"method": method.state_dict()}, old)
    wanted = rf"old.pt holds network layout 1, this version needs layout {ARCHITECTURE}"
    with pytest.raises(CheckpointError, match=wanted):
        load_pretrained_encoder(old_path, cfg.model)
    seg_old = save_checkpoint(tmp_path / "seg_old.pt", {"model": {}}, {"kind": "segmentation", "config": cfg.to_dict()})
    with pytest.raises(CheckpointError, match="seg_old.pt holds network layout 1"):
        load_segmentation(seg_old)


def test_sparks_pretraining_decoder_starts_the_segmentation_decoder(tmp_path, dims):
    """``train.init_decoder``: the segmentation decoder takes the U-Net of SparK's pretraining decoder, all but
    its output level (classes here, image channels there); that part and nothing else starts fresh, the
    loaded part learns in the pretrained group, and a checkpoint whose decoder does not fit is refused."""
    from amlp_core.engine.artefacts import load_pretrained, pretrained_meta
    from amlp_core.engine.checkpoint import save_checkpoint
    from amlp_core.engine.optim import finetune_optimizer
    from amlp_core.errors import CheckpointError
    from amlp_core.models.segmentation import OUTPUT_LEVEL
    from tests.conftest import tiny_config

    cfg = tiny_config(dims).replace(model={"pretrain_decoder": "unet"}, train={"init_decoder": True})
    method = build_method(cfg.model, cfg.method)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.1)
    path = save_checkpoint(tmp_path / "pre.pt", {"method": method.state_dict()}, pretrained_meta(cfg, 1))
    net = SegmentationNet(cfg.model)
    fresh = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    load_pretrained(path, net, decoder=True)
    pre = method.decoder.unet.state_dict()
    for key, value in net.decoder.state_dict().items():
        if key.startswith(OUTPUT_LEVEL):
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, pre[key]), key
    optimizer = finetune_optimizer(net, cfg.train, pretrained=True)
    fresh_group, loaded_group = optimizer.param_groups
    assert loaded_group["ramp"] == cfg.train.encoder_warmup
    fresh_ids = {id(p) for p in fresh_group["params"]}
    assert fresh_ids == {id(p) for n, p in net.named_parameters() if n.startswith("decoder." + OUTPUT_LEVEL)}
    # A decoder of other widths (another run's model) does not fit: refused, naming the file.
    state = dict(method.state_dict())
    key = "decoder.unet.bottom.conv.unit0.conv.weight"
    state[key] = state[key][:1]
    bad = save_checkpoint(tmp_path / "bad.pt", {"method": state}, pretrained_meta(cfg, 1))
    with pytest.raises(CheckpointError, match="bad.pt: the pretraining decoder does not fit.*bottom.conv.unit0"):
        load_pretrained(bad, SegmentationNet(cfg.model), decoder=True)
    with pytest.raises(Exception, match="train.init_decoder=True: needs model.pretrain_decoder=unet"):
        tiny_config(dims).replace(train={"init_decoder": True})
