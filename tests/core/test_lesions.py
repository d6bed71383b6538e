"""Lesion post-processing and metrics (amlp_core/engine/lesions.py), and how the server pools them."""

import math
import time

import numpy as np
import pytest

from amlp_core import protocol as P
from amlp_core.engine.lesions import (
    EMPTY_CASES,
    EMPTY_HITS,
    EMPTY_SHARE,
    LESION_CASES,
    LESION_DICE,
    LesionTally,
    pool_lesion_metrics,
    postprocess,
)
from server.rounds import collect
from server.strategies import pool_evaluations
from server.validation import Declarations, check_replies
from tests.server.helpers import reply, request


def _blobs() -> np.ndarray:
    labels = np.zeros((40, 40), np.int64)
    labels[5:15, 5:15] = 1  # 100 pixels
    labels[30:33, 30:33] = 1  # 9 pixels
    labels[20:22, 2:4] = 2  # 4 pixels of class 2
    labels[25:35, 2:12] = 2  # 100 pixels of class 2
    return labels


def test_postprocess_keeps_the_largest_component_of_each_class():
    out = postprocess(_blobs(), 3, keep_largest=True)
    assert (out == 1).sum() == 100 and (out == 2).sum() == 100
    assert out[31, 31] == 0 and out[21, 3] == 0


def test_postprocess_removes_small_components():
    labels = _blobs()
    out = postprocess(labels, 3, min_share=8 / 1600)  # components under 8 pixels go
    assert (out == 1).sum() == 109 and (out == 2).sum() == 100
    assert np.array_equal(postprocess(labels, 3), labels)  # nothing asked, nothing changed
    assert np.array_equal(labels, _blobs())  # the input is left alone


def test_postprocess_3d_uses_full_connectivity():
    labels = np.zeros((6, 6, 6), np.int64)
    labels[1, 1, 1] = labels[2, 2, 2] = 1  # touching by a corner: one component
    labels[5, 5, 5] = 1
    out = postprocess(labels, 2, keep_largest=True)
    assert out.sum() == 2 and out[5, 5, 5] == 0


def test_the_lesion_tally():
    tally = LesionTally()
    truth = np.zeros((10, 10), np.int64)
    truth[2:6, 2:6] = 1
    pred = np.zeros_like(truth)
    pred[2:6, 2:4] = 1
    tally.add(pred, truth)  # Dice 2 * 8 / (8 + 16)
    tally.add(np.zeros_like(truth), np.zeros_like(truth))  # a normal image predicted empty
    tally.add(pred, np.zeros_like(truth))  # a normal image with a false lesion
    m = tally.metrics()
    assert m[LESION_DICE] == pytest.approx(2 / 3) and m[LESION_CASES] == 1
    assert (m[EMPTY_CASES], m[EMPTY_HITS], m[EMPTY_SHARE]) == (2, 1, 0.5)
    only_lesions = LesionTally()
    only_lesions.add(pred, truth)
    assert EMPTY_SHARE not in only_lesions.metrics()


def test_pooled_metrics_equal_the_metrics_of_all_cases_together():
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(12):
        truth = (rng.random((8, 8)) < 0.3).astype(np.int64) if i % 3 else np.zeros((8, 8), np.int64)
        pairs.append(((rng.random((8, 8)) < 0.3).astype(np.int64) * (i % 4 != 0), truth))
    whole, sites = LesionTally(), []
    for part in (pairs[:2], pairs[2:9], pairs[9:]):
        site = LesionTally()
        for p, t in part:
            site.add(p, t)
            whole.add(p, t)
        sites.append(site.metrics())
    pooled = pool_lesion_metrics(sites)
    for key, value in whole.metrics().items():
        assert pooled[key] == pytest.approx(value)
    assert pool_lesion_metrics([{"dice_1": 0.5}]) == {}


def _declared() -> Declarations:
    declared = Declarations(timeout=1.0)
    for node in (1, 2):
        declared.counts[node] = {P.DECLARED_TRAIN: 10, P.DECLARED_LABELLED: 10, P.DECLARED_TEST: 10}
    return declared


def _lesion_reply(node, site, lesions, empty, hits, dice, n=None):
    metrics = {
        P.NUM_EXAMPLES: lesions + empty if n is None else n,
        "dice_1": 0.5,
        "dice_mean": 0.5,
        LESION_DICE: dice,
        LESION_CASES: lesions,
        EMPTY_CASES: empty,
        EMPTY_HITS: hits,
    }
    if empty:
        metrics[EMPTY_SHARE] = hits / empty
    return reply(node, {}, metrics, site)


@pytest.mark.parametrize(
    "lesions, empty, hits, dice, n, words",
    [
        (9, 1, 1, 0.5, 3, "do not add up"),  # inflated counts: would weigh its Dice by 10 cases, not 3
        (2, 1, 2, 0.5, None, "do not add up"),  # more hits than lesion-free images
        (2, 1, 1, 1.5, None, "lesion_dice=1.5"),
        (2.5, 0.5, 0, 0.5, 3, "not a count"),
    ],
)
def test_impossible_lesion_metrics_are_rejected(lesions, empty, hits, dice, n, words):
    outcome = collect([request(1)], [_lesion_reply(1, "a", lesions, empty, hits, dice, n)], time.monotonic())
    check_replies(outcome.replies, None, "evaluate", _declared(), 0.0)
    assert outcome.replies[0].status == P.REJECTED and words in outcome.replies[0].error


def test_the_server_pools_lesion_metrics_from_counts():
    replies = [_lesion_reply(1, "a", 2, 8, 6, 0.9), _lesion_reply(2, "b", 8, 0, 0, math.nan)]
    outcome = collect([request(1), request(2)], replies, time.monotonic())
    check_replies(outcome.replies, None, "evaluate", _declared(), 0.0)
    assert [r.status for r in outcome.replies] == [P.OK, P.OK]
    pooled = pool_evaluations([r.message.content for r in outcome.ok], P.NUM_EXAMPLES)
    assert pooled[LESION_DICE] == pytest.approx(0.9)  # site b has lesion images but reported no Dice
    assert (pooled[LESION_CASES], pooled[EMPTY_CASES], pooled[EMPTY_HITS]) == (10, 8, 6)
    assert pooled[EMPTY_SHARE] == pytest.approx(0.75)


def test_postprocess_drops_faint_components():
    """The per-image decision: a component whose mean probability of its class is low is no lesion."""
    labels = np.zeros((20, 20), np.int64)
    labels[2:6, 2:6] = 1  # confident
    labels[12:18, 12:18] = 1  # faint (larger)
    fg = np.where(labels > 0, 0.55, 0.1)
    fg[2:6, 2:6] = 0.95
    probs = np.stack([1 - fg, fg])  # [2, 20, 20]
    out = postprocess(labels, 2, min_confidence=0.7, probabilities=probs)
    assert out[3, 3] == 1 and out[15, 15] == 0 and out.sum() == 16
    kept = postprocess(labels, 2, keep_largest=True, min_confidence=0.7, probabilities=probs)
    assert kept.sum() == 16 and kept[3, 3] == 1  # the largest of the confident ones, not the faint larger one
    assert np.array_equal(postprocess(labels, 2, min_confidence=0.7), labels)  # no probabilities: not applied


def test_mirrored_predictions_are_averaged():
    """``flips``: 2**dims passes over mirrored images, each mapped back: a mirror-symmetric model gives the
    same probabilities, an asymmetric one the average of its mirrored outputs."""
    import torch

    from amlp_core.engine.loops import predict_volume

    class LeftBias(torch.nn.Module):  # logit of class 1 grows along the last axis
        def forward(self, x):
            ramp = torch.linspace(-3, 3, x.shape[-1]).expand_as(x[:, :1])
            return torch.cat([torch.zeros_like(ramp), ramp], dim=1)

    image = np.zeros((1, 8, 8), np.float32)
    plain = predict_volume(LeftBias(), image, (8, 8), torch.device("cpu"), amp=False)
    mirrored = predict_volume(LeftBias(), image, (8, 8), torch.device("cpu"), amp=False, flips=True)
    assert plain[1, 0, 0] < 0.1 and plain[1, 0, -1] > 0.9
    assert torch.allclose(mirrored[1], torch.full((8, 8), 0.5), atol=1e-5)  # the ramp and its mirror cancel
