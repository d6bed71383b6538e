import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from amlp_core.data import make_phantom_samples
from amlp_core.masking import Mask, MPSMasking, batched_kmeans, num_masked, patch_stats, random_mask
from amlp_core.masking.mps import FeatureScale
from amlp_core.models import HybridEncoder, patchify
from tests.conftest import tiny_model


def test_mask_from_bool_indices_are_consistent():
    masked = torch.tensor([[True, False, True, False], [False, True, True, False]])
    m = Mask.from_bool(masked)
    assert m.ids_keep.tolist() == [[1, 3], [0, 3]] and m.ids_masked.tolist() == [[0, 2], [1, 2]]
    order = torch.cat([m.ids_keep, m.ids_masked], 1)
    assert torch.equal(torch.gather(order, 1, m.ids_restore), torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match="same number"):
        Mask.from_bool(torch.tensor([[True, False], [True, True]]))


def test_random_mask_counts_and_seeding():
    a = random_mask(3, 100, 0.75, torch.Generator().manual_seed(1))
    b = random_mask(3, 100, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(a.masked, b.masked) and a.masked.sum(1).tolist() == [75, 75, 75]
    assert num_masked(10, 0.99) == 9 and num_masked(10, 0.01) == 1


def _sklearn_reference(x: np.ndarray, k: int):
    km = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x)
    return km.labels_, km.inertia_


def _inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    return float((x - centroids[labels]).pow(2).sum())


def test_batched_kmeans_matches_sklearn_on_blobs():
    rng = np.random.default_rng(0)
    batch = []
    for b in range(4):
        centers = rng.normal(0, 6, size=(3, 5))
        batch.append(np.concatenate([c + rng.normal(0, 1, size=(40, 5)) for c in centers]))
    x = torch.tensor(np.stack(batch), dtype=torch.float32)
    labels, centroids = batched_kmeans(x, 3, iters=20, inits=3, generator=torch.Generator().manual_seed(0))
    for b in range(4):
        ref_labels, ref_inertia = _sklearn_reference(batch[b], 3)
        assert adjusted_rand_score(ref_labels, labels[b].numpy()) > 0.99
        assert _inertia(x[b], labels[b], centroids[b]) <= ref_inertia * 1.001


def test_batched_kmeans_matches_sklearn_on_mps_features():
    """The check the spec asks for: same features, k-means batched on the device vs scikit-learn."""
    cfg = tiny_model(2)
    samples = make_phantom_samples(6, cfg.img_size, seed=3)
    images = torch.tensor(np.stack([s.image for s in samples]))
    torch.manual_seed(0)
    mps = MPSMasking()
    with torch.no_grad():
        feats = mps.features(_stem(cfg, images), images, cfg.patch_size)
    scaled = FeatureScale.fit(feats)(feats)
    labels, centroids = batched_kmeans(scaled, 2, iters=30, inits=10, generator=torch.Generator().manual_seed(0))
    for b in range(len(samples)):
        ref_labels, ref_inertia = _sklearn_reference(scaled[b].numpy(), 2)
        ours = _inertia(scaled[b], labels[b], centroids[b])
        # Patch features have near-equal optima, so the labels may differ where the clustering is as good:
        # the check is that ours is never a worse clustering than scikit-learn's.
        assert ours <= ref_inertia * 1.01, f"image {b}: inertia {ours:.3f} vs scikit-learn {ref_inertia:.3f}"
        if abs(ours - ref_inertia) <= 1e-5 * ref_inertia:  # the same optimum (not a near-tie): the same partition
            assert adjusted_rand_score(ref_labels, labels[b].numpy()) > 0.95


def _stem(cfg, images):
    enc = HybridEncoder(cfg)
    return enc.stem(enc.first_conv(images))


def _lesion_patches(samples, patch):
    labels = torch.tensor(np.stack([s.label for s in samples]))[:, None].float()
    return patchify(labels, patch).amax(-1) > 0  # [B, N]


def test_mps_masks_the_budget_lesion_group_first():
    cfg = tiny_model(2)
    samples = make_phantom_samples(8, cfg.img_size, seed=0)
    images = torch.tensor(np.stack([s.image for s in samples]))
    feats = MPSMasking().features(_stem(cfg, images).detach(), images, cfg.patch_size)
    mps = MPSMasking(random_fraction=0.0)
    clustering = mps.cluster(feats, torch.Generator().manual_seed(0))
    ratio = 0.25
    mask = mps.select(clustering, ratio, torch.Generator().manual_seed(0))
    assert mask.masked.sum(1).tolist() == [num_masked(cfg.num_patches, ratio)] * 8
    lesion_group = clustering.rank == mps.lesion_rank
    for b in range(8):  # with no random share, background is masked only once the lesion group is used up
        if int(lesion_group[b].sum()) >= int(mask.masked[b].sum()):
            assert bool(lesion_group[b][mask.masked[b]].all())
        else:
            assert bool(mask.masked[b][lesion_group[b]].all())


@pytest.mark.parametrize("proj_dim", [0, 4])
def test_mps_finds_more_lesion_patches_than_random_masking(proj_dim):
    cfg = tiny_model(2)
    samples = make_phantom_samples(16, cfg.img_size, seed=1)
    images = torch.tensor(np.stack([s.image for s in samples]))
    truth = _lesion_patches(samples, cfg.patch_size)
    torch.manual_seed(0)
    width = cfg.conv_channels[0]
    mps = MPSMasking(embed_dim=width, proj_dim=proj_dim)
    feats = mps.features(_stem(cfg, images).detach(), images, cfg.patch_size)
    assert feats.shape[-1] == (proj_dim if 0 < proj_dim < width else width) + 2
    g = torch.Generator().manual_seed(0)
    mask = mps.select(mps.cluster(feats, g), 0.25, g)
    share = float((truth & mask.masked).sum() / mask.masked.sum())
    random_share = float(truth.float().mean())  # the expected share of a uniformly random mask
    assert share >= 2 * random_share, (share, random_share)


def test_lesion_group_follows_the_running_loss():
    mps = MPSMasking(clusters=2, momentum=0.5)
    assert mps.lesion_rank == 0  # smallest group until any loss is known
    rank = torch.tensor([[0, 0, 1, 1, 1, 1]])
    from amlp_core.masking.mps import Clustering

    c = Clustering(rank=rank, centroids=torch.zeros(1, 2, 3), scale=None)
    mask = Mask.from_bool(torch.tensor([[True, False, True, True, False, False]]))
    mps.update(c, mask, torch.tensor([[0.1, 9.0, 2.0, 4.0, 9.0, 9.0]]))  # unmasked losses are ignored
    assert torch.allclose(mps.group_loss, torch.tensor([0.1, 3.0]))
    assert mps.lesion_rank == 1
    mps.update(c, mask, torch.tensor([[10.0, 0.0, 0.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(mps.group_loss, torch.tensor([5.05, 1.5])) and mps.lesion_rank == 0


@pytest.mark.parametrize("shape", [(2, 1, 16, 24), (2, 2, 8, 16, 8)])
def test_patch_stats_equal_the_patches_mean_and_std(shape):
    images = torch.randn(*shape) * 3 + 1
    patches = patchify(images, 4)  # [B, N, C * p**dims]
    stats = patch_stats(images, 4)
    assert stats.shape == (*patches.shape[:2], 2)
    assert torch.allclose(stats[..., 0], patches.mean(-1), atol=1e-5)
    assert torch.allclose(stats[..., 1], patches.std(-1), atol=1e-4)


def test_random_projection_is_fixed_and_not_saved():
    a, b = MPSMasking(embed_dim=32, proj_dim=8), MPSMasking(embed_dim=32, proj_dim=8)
    assert a.projection.shape == (32, 8) and torch.equal(a.projection, b.projection)  # same at every site
    assert "projection" not in a.state_dict()
    assert MPSMasking(embed_dim=8, proj_dim=16).projection is None  # nothing to gain: kept whole


def test_lesion_group_needs_a_clear_lead_to_leave_the_smallest_group():
    from amlp_core.masking.mps import Clustering

    mps = MPSMasking(clusters=2, momentum=0.0, margin=0.05)
    c = Clustering(rank=torch.tensor([[0, 1]]), centroids=torch.zeros(1, 2, 3), scale=None)
    both = Mask.from_bool(torch.tensor([[True, True]]))
    mps.update(c, both, torch.tensor([[1.00, 1.04]]))  # 4 % harder: within the noise margin
    assert mps.lesion_rank == 0
    mps.update(c, both, torch.tensor([[1.00, 1.20]]))  # 20 % harder: a clear lead
    assert mps.lesion_rank == 1


def test_mps_embed_weight_zero_clusters_on_intensity_alone():
    """``method.mps_embed_weight=0``: the encoder's columns no longer count, the intensity mean and spread
    alone decide the groups; weighed up, a strong embedding split wins instead."""
    from amlp_core.masking import cluster_patches

    n = 64
    bright = torch.arange(n) < 16  # 16 bright patches: the small group by intensity
    embed_split = torch.arange(n) % 2 == 0  # the embedding splits the patches another way, strongly
    embed = torch.where(embed_split[:, None], 10.0, -10.0) * torch.ones(n, 16)
    stats = torch.stack([torch.where(bright, 3.0, 0.0), torch.where(bright, 1.0, 0.2)], dim=-1)
    feats = torch.cat([embed, stats], dim=-1)[None]  # [1, N, 18]
    g = torch.Generator().manual_seed(0)
    alone = cluster_patches(feats, 2, 20, 3, g, embed_weight=0.0)
    assert torch.equal(alone.rank[0] == 0, bright)  # the smallest group: exactly the bright patches
    heavy = cluster_patches(feats, 2, 20, 3, torch.Generator().manual_seed(0), embed_weight=4.0)
    assert torch.equal(heavy.rank[0] == heavy.rank[0, 0], embed_split)
