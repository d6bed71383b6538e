"""AHM (actor-critic masking agent) and ACE (EMA teacher, 2:1 crops): shapes, learning, federation hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amlp_core.config import METHOD_NAMES, MethodConfig, TrainConfig
from amlp_core.data import make_phantom_samples
from amlp_core.engine.optim import pretrain_optimizer
from amlp_core.errors import ConfigError
from amlp_core.methods import METHODS, build_method, mask_ratio_at
from amlp_core.methods.ace import blocks, overlap_ids, teacher_momentum, two_scale_views, unblocks
from amlp_core.models import SegmentationNet, encoder_state, patchify, unpatchify
from tests.client.helpers import phantom_plan
from tests.conftest import tiny_model


def _phantoms(cfg, n=4, seed=0) -> torch.Tensor:
    return torch.tensor(np.stack([s.image for s in make_phantom_samples(n, cfg.img_size, seed=seed)]))


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_and_config_know_both():
    assert {"ahm", "ace"} <= set(METHODS) and set(METHODS) == set(METHOD_NAMES)  # the schema lists the registry
    with pytest.raises(ConfigError, match="method.ahm_entropy_weight"):
        MethodConfig(ahm_entropy_weight=-0.1)
    with pytest.raises(ConfigError, match="method.ace_momentum"):
        MethodConfig(ace_momentum=1.5)
    with pytest.raises(ConfigError, match="method.ace_teacher_temp"):
        MethodConfig(ace_teacher_temp=0.0)


# -- AHM -------------------------------------------------------------------------------------


def test_ahm_step_shapes_and_gradients(dims):
    cfg = tiny_model(dims)
    method = build_method(cfg, MethodConfig(name="ahm"))
    images = _phantoms(cfg)
    scores = method.agent(images)
    assert scores.logits.shape == scores.values.shape == (4, cfg.num_patches)
    draw = method.agent.select(scores, 0.75, _gen())
    assert draw.order.shape == (4, cfg.num_patches)
    assert torch.equal(draw.order.sort(1).values, torch.arange(cfg.num_patches).expand(4, -1))  # a permutation
    k = draw.mask.ids_masked.shape[1]
    assert torch.equal(draw.order[:, :k].sort(1).values, draw.mask.ids_masked)  # the first k drawn are masked

    out = method.training_step(images, progress=0.3, generator=_gen())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.mask.masked.shape == (4, cfg.num_patches)
    assert out.metrics["ratio"] == pytest.approx(0.75, abs=1 / cfg.num_patches)  # fixed ratio, no AMR
    assert {"rec", "actor", "critic", "entropy"} <= set(out.metrics)
    out.loss.backward()
    for part in (method.encoder, method.decoder, method.agent):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_ahm_starts_uniform_and_draws_are_seeded():
    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name="ahm"))
    scores = method.agent(_phantoms(cfg))
    assert torch.allclose(scores.logits, torch.zeros_like(scores.logits))  # actor head starts at zero
    a, b = (method.agent.select(scores, 0.5, _gen(3)).mask.masked for _ in range(2))
    assert torch.equal(a, b)


def _hard_patch_batch(cfg, batch: int, g: torch.Generator, share: float = 0.25):
    """Images whose patches are smooth (easy) except a random ``share`` per image of white noise
    (a reconstruction loss near 1 that no training removes). Returns images and the hard-patch mask."""
    n, p = cfg.num_patches, cfg.patch_size
    hard = torch.zeros(batch, n, dtype=torch.bool)
    hard.scatter_(1, torch.rand(batch, n, generator=g).argsort(1)[:, : int(share * n)], True)
    size = p**cfg.spatial_dims
    smooth = 0.1 * torch.linspace(-1, 1, size).expand(batch, n, size) + torch.randn(batch, 1, 1, generator=g)
    patches = torch.where(hard.unsqueeze(-1), torch.randn(batch, n, size, generator=g), smooth)
    return unpatchify(patches, p, cfg.grid_size, 1), hard


def test_ahm_agent_learns_to_mask_the_hard_patches():
    torch.manual_seed(0)
    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name="ahm", mask_ratio=0.25))
    opt = torch.optim.AdamW([{"params": g["params"], "lr": 1e-3 * g["lr_scale"]} for g in method.param_groups()])
    g = _gen()

    def mass_and_share(images, hard):
        with torch.no_grad():
            pi = torch.softmax(method.agent(images).logits, 1)
            masked = method.agent.select(method.agent(images), 0.25, _gen(1)).mask.masked
        return float((pi * hard).sum(1).mean()), float((masked & hard).sum() / masked.sum())

    test_images, test_hard = _hard_patch_batch(cfg, 16, _gen(99))
    before = mass_and_share(test_images, test_hard)
    for _ in range(60):
        images, _ = _hard_patch_batch(cfg, 8, g)
        out = method.training_step(images, progress=1.0, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    mass, share = mass_and_share(test_images, test_hard)  # on images the agent never saw
    assert before[0] == pytest.approx(0.25, abs=0.01)  # uniform at the start: mass = share of hard patches
    assert mass > 0.6 and share > 0.6, (before, mass, share)  # random masking: 0.25


# -- ACE -------------------------------------------------------------------------------------


def test_ace_step_shapes_and_gradients(dims):
    cfg = tiny_model(dims)
    method = build_method(cfg, MethodConfig(name="ace"))
    assert method.decoder is None  # no pixel reconstruction
    out = method.training_step(_phantoms(cfg), progress=0.0, generator=_gen())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.mask is None
    m = out.metrics
    assert m["ratio"] == 0.0 and m["loss"] == pytest.approx(0.1 * m["global"] + (m["comp"] + m["decomp"]) / 2, rel=1e-5)
    out.loss.backward()
    for part in (method.encoder, method.head, method.compose, method.decompose):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())


def test_small_view_tokens_lie_inside_their_large_view_token(dims):
    """Ramp images (value = coordinate along one axis) give each small-view patch's source position."""
    cfg = tiny_model(dims)
    p, grid = cfg.patch_size, cfg.grid_size
    b = 6
    strides = [math.prod(grid[a + 1 :]) for a in range(dims)]
    for axis in range(dims):
        shape = [1] * dims
        shape[axis] = -1
        ramp = torch.arange(cfg.img_size[axis], dtype=torch.float32).view(1, 1, *shape).expand(b, 1, *cfg.img_size)
        small, offsets = two_scale_views(ramp.contiguous(), p, _gen(axis))
        assert small.shape == ramp.shape and offsets.shape == (b, dims)
        assert bool(((offsets >= 0) & (offsets <= torch.tensor(grid) // 2)).all())
        source = patchify(small, p).mean(-1)  # [B, N] mean source coordinate along `axis`
        parent_coord = torch.div(source, p, rounding_mode="floor").long()  # large-view token coordinate
        ids = overlap_ids(offsets, grid)  # [B, M]
        expected = (ids // strides[axis]) % grid[axis]  # coordinate of each block's large-view token
        assert ids.shape == (b, cfg.num_patches // 2**dims)
        got = blocks(parent_coord.unsqueeze(-1), grid).squeeze(-1)  # [B, M, c]
        assert torch.equal(got, expected.unsqueeze(-1).expand_as(got))


def test_blocks_round_trip(dims):
    grid = tiny_model(dims).grid_size
    n = math.prod(grid)
    tokens = torch.randn(2, n, 5)
    grouped = blocks(tokens, grid)
    assert grouped.shape == (2, n // 2**dims, 2**dims, 5)
    assert torch.equal(unblocks(grouped, grid), tokens)


def test_ema_teacher_moves_by_one_minus_momentum():
    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name="ace"))
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student = {
        **{f"encoder.{k}": v for k, v in method.encoder.state_dict().items()},
        **{f"head.{k}": v for k, v in method.head.state_dict().items()},
    }
    method.update_teacher(0.9)
    for k, v in method.teacher.state_dict().items():
        assert torch.allclose(v, before[k] + 0.1 * (student[k] - before[k]), atol=1e-6), k
    # In a step, the teacher takes the EMA step of the schedule's momentum at that progress.
    assert teacher_momentum(0.0, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(0.5, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(1.0, 0.996) == 1.0
    before = {k: v.clone() for k, v in method.teacher["encoder"].state_dict().items()}
    method.training_step(_phantoms(cfg), progress=0.5, generator=_gen())
    for k, v in method.teacher["encoder"].state_dict().items():
        s = method.encoder.state_dict()[k]
        assert torch.allclose(v, before[k] + 0.002 * (s - before[k]), atol=1e-6), k


def test_ace_teacher_restarts_from_a_received_encoder_and_keeps_its_own_state():
    cfg = tiny_model(2)
    site = build_method(cfg, MethodConfig(name="ace"))
    site.update_teacher(0.0)
    with torch.no_grad():
        for p in site.teacher.parameters():
            p.add_(1.0)  # a teacher that differs from the student
    saved = {k: v.clone() for k, v in site.state_dict().items()}
    fresh = build_method(cfg, MethodConfig(name="ace"))
    fresh.load_state_dict(saved)  # the site's own state: teacher kept
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    torch.manual_seed(1)
    global_encoder = build_method(cfg, MethodConfig(name="ace")).shared_state_dict()
    fresh.load_state_dict(global_encoder, strict=False)  # a round's global weights: teacher restarts
    for k, v in fresh.teacher["encoder"].state_dict().items():
        assert torch.equal(v, global_encoder[f"encoder.{k}"])
    assert all(torch.equal(t, s) for t, s in zip(fresh.teacher["head"].parameters(), fresh.head.parameters()))


def test_ace_needs_an_even_patch_grid():
    from amlp_core.config import ModelConfig

    cfg = ModelConfig(
        spatial_dims=2,
        img_size=(24, 32),
        patch_size=8,
        embed_dim=48,
        num_heads=4,
        decoder_dim=24,
        decoder_heads=4,
        conv_channels=(8,),
    )
    with pytest.raises(ConfigError, match="model.img_size"):
        build_method(cfg, MethodConfig(name="ace"))


# -- both ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ahm", "ace"])
def test_loss_decreases_on_phantoms(name):
    torch.manual_seed(0)
    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name=name))
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    images = _phantoms(cfg, n=16, seed=1)
    g = _gen()
    key = "rec" if name == "ahm" else "loss"  # AHM's actor term is a policy-gradient surrogate, not a loss
    losses = []
    for _ in range(40):
        out = method.training_step(images, progress=0.0, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics[key])
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_shared_state_dicts():
    cfg = tiny_model(2)
    ahm = build_method(cfg, MethodConfig(name="ahm"))
    shared = ahm.shared_state_dict()
    assert {k.split(".")[0] for k in shared} == {"encoder", "agent"}
    assert {k for k in ahm.state_dict() if k.startswith("agent.")} <= set(shared)  # the whole agent
    ace = build_method(cfg, MethodConfig(name="ace"))
    assert set(ace.shared_state_dict()) == {f"encoder.{k}" for k in ace.encoder.state_dict()}


@pytest.mark.parametrize("name", ["ahm", "ace"])
def test_encoder_loads_strictly_into_the_segmentation_net(name, dims):
    cfg = tiny_model(dims)
    method = build_method(cfg, MethodConfig(name=name))
    method.training_step(_phantoms(cfg), progress=0.5, generator=_gen()).loss.backward()
    net = SegmentationNet(cfg)
    net.encoder.load_state_dict(encoder_state(method.state_dict()), strict=True)  # not the ACE teacher's
    assert all(
        torch.equal(a, b) for a, b in zip(net.encoder.state_dict().values(), method.encoder.state_dict().values())
    )


def test_optimizer_groups():
    cfg = tiny_model(2)
    train = TrainConfig(lr=1e-4)
    ahm = build_method(cfg, MethodConfig(name="ahm", ahm_agent_lr_scale=10.0))
    groups = pretrain_optimizer(ahm, train).param_groups
    agent_ids = {id(p) for p in ahm.agent.parameters()}
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3])
    assert {id(p) for p in groups[1]["params"]} == agent_ids
    ace = build_method(cfg, MethodConfig(name="ace"))
    optimised = {id(p) for g in pretrain_optimizer(ace, train).param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in ace.teacher.parameters()}


def test_ratios_the_server_sends():
    assert mask_ratio_at(MethodConfig(name="ahm", mask_ratio=0.6), 0.3) == 0.6
    assert mask_ratio_at(MethodConfig(name="ace"), 0.3) == 0.0


# -- federation: the server's own instructions and initial weights, real messages to the ClientApp --


@pytest.mark.parametrize("name", ["ahm", "ace"])
def test_federated_rounds_through_the_client_app(tmp_path, name):
    from flwr.app import ArrayRecord

    from amlp_core import protocol as P
    from client.app import app
    from client.state import SiteState
    from server.federation import Federation
    from tests.client.helpers import cfg as _cfg
    from tests.client.helpers import context as _context
    from tests.client.helpers import train_message as _train_message

    cfg = _cfg(tmp_path, **{"method.name": name})
    server = Federation(None, cfg)  # no grid needed for the instructions and the initial weights
    server.plan = phantom_plan(cfg)  # what it decides for phantom sites
    total = cfg.federation.pretrain_rounds
    ctx = _context(cfg, 0)
    sent = server.initial_encoder().to_torch_state_dict()
    for rnd in (1, 2):  # round 2 starts from round 1's state at the site
        instructions = server._instructions(P.PRETRAIN, rnd, total)
        assert instructions[P.EXPECTED_RATIO] == (0.75 if name == "ahm" else 0.0)
        reply = app(_train_message(cfg, sent, instructions, ctx.node_id), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        arrays = reply.content[P.ARRAYS].to_torch_state_dict()
        assert set(arrays) == set(sent)
        assert any(not torch.equal(arrays[k], sent[k]) for k in sent)  # it trained
        assert reply.content[P.METRICS][P.MASK_RATIO] == pytest.approx(
            instructions[P.EXPECTED_RATIO], abs=1 / cfg.model.num_patches
        )
        sent = arrays
    assert {k.split(".")[0] for k in sent} == ({"encoder", "agent"} if name == "ahm" else {"encoder"})
    server.initial_segmentation(ArrayRecord(sent))  # the fine-tuning phase takes the encoder strictly
    local = SiteState(cfg.federation.run_dir + "/sites/site0").load_before(P.PRETRAIN, 3)
    kept = {k.split(".")[0] for k in local["method"]}
    assert ({"decoder", "agent"} if name == "ahm" else {"teacher", "head", "compose", "decompose", "center"}) <= kept
    assert local["optimizer"]["state"]  # the optimiser's moments stay at the site too
    skewed = server._instructions(P.PRETRAIN, 3, total)
    skewed[P.EXPECTED_RATIO] = 0.5
    reply = app(_train_message(cfg, sent, skewed, ctx.node_id), ctx)
    assert reply.has_error() and "masking ratio mismatch" in reply.error.reason


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus' hooks on the first layer
@pytest.mark.parametrize("name", ["ahm", "ace"])
def test_a_private_step(name):
    """Under DP-SGD (Opacus per-case gradients) both methods train; ACE's centre stays frozen."""
    from amlp_core.privacy.dp import PrivateTraining

    cfg = tiny_model(2)
    method = build_method(cfg, MethodConfig(name=name), private=True)
    cases = [{"image": torch.tensor(s.image)} for s in make_phantom_samples(8, cfg.img_size, seed=0)]
    before = {k: v.clone() for k, v in method.state_dict().items()}
    with PrivateTraining(method, pretrain_optimizer(method, TrainConfig()), cases, 4, 1.0, 1.0, seed=0) as dp:
        batch = next(b for b in dp.loader if b is not None)
        out = method.training_step(batch["image"], progress=0.5, generator=_gen())
        dp.optimizer.zero_grad()
        out.loss.backward()
        dp.optimizer.step()
    after = method.state_dict()
    assert not torch.equal(after["encoder.patch_embed.weight"], before["encoder.patch_embed.weight"])
    if name == "ace":
        assert torch.equal(after["center"], before["center"])
