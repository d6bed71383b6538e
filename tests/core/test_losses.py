import torch

from amlp_core.losses import (
    category_consistency_loss,
    dice_ce_loss,
    hard_targets,
    lesion_assignment,
    normalize_patches,
    plain_reconstruction_loss,
    relative_reconstruction_loss,
    relative_weights,
)


def test_relative_weights_average_one_and_favour_hard_patches():
    losses = torch.tensor([[0.1, 0.2, 0.3, 1.4], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    w = relative_weights(losses)
    assert torch.allclose(w.mean(1), torch.ones(2))
    assert torch.all(w[0, 1:] > w[0, :-1])  # monotone in the loss
    assert torch.allclose(w[1], torch.ones(4))  # equal losses: plain mean
    assert not w.requires_grad  # weights are detached
    assert torch.isclose(relative_reconstruction_loss(losses[1:]), plain_reconstruction_loss(losses[1:]))
    assert relative_reconstruction_loss(losses[:1]) > plain_reconstruction_loss(losses[:1])
    # Lower temperature sharpens the weighting.
    assert relative_weights(losses, tau=0.1)[0, -1] > w[0, -1]


def test_normalize_patches():
    p = torch.randn(2, 5, 64) * 3 + 7
    n = normalize_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(n.std(-1, unbiased=True), torch.ones(2, 5), atol=1e-3)


def test_ccl_moves_hard_patches_toward_the_lesion_centroid():
    centroids = torch.tensor([[[2.0, 0.0], [-2.0, 0.0]]])  # lesion = 0
    feats = torch.zeros(1, 4, 2, requires_grad=True)
    l_masked = torch.tensor([[0.1, 0.2, 3.0, 4.0]])
    assert hard_targets(l_masked).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    loss = category_consistency_loss(feats, centroids, 0, l_masked)
    loss.backward()
    # Gradient descent moves hard patches toward the lesion centroid (+x) and easy ones away.
    assert feats.grad[0, 2, 0] < 0 and feats.grad[0, 3, 0] < 0
    assert feats.grad[0, 0, 0] > 0 and feats.grad[0, 1, 0] > 0
    q = lesion_assignment(torch.tensor([[[2.0, 0.0], [-2.0, 0.0]]]), centroids, 0)
    assert q[0, 0] > 0.9 and q[0, 1] < 0.1


def test_ccl_does_not_backpropagate_into_centroids():
    centroids = torch.randn(2, 2, 3, requires_grad=True)
    feats = torch.randn(2, 5, 3, requires_grad=True)
    category_consistency_loss(feats, centroids, 1, torch.rand(2, 5)).backward()
    assert centroids.grad is None and feats.grad is not None


def test_dice_ce_prefers_the_right_answer():
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[..., 2:5, 2:5] = 1
    good = torch.cat([(labels == 0).float(), (labels == 1).float()], 1) * 10
    bad = good.flip(1)
    loss = dice_ce_loss()
    assert loss(good, labels) < 0.1 < loss(bad, labels)
