"""Matching and sampling against torchvision's Matcher, SSDMatcher and
BalancedPositiveNegativeSampler, with padded ground truth, ties and empty images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.ops import box_iou

from flaxbones.detection import targets


def _quality(num_gt, num_pred, seed):
    """IoUs of random boxes, with exact ties (duplicated predictions and ground truth)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 50, (num_gt + num_pred, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, xy.shape)], 1).astype(np.float32)
    gt, pred = boxes[:num_gt], boxes[num_gt:]
    pred[1::7] = pred[::7][: len(pred[1::7])]
    gt[-1] = gt[0]
    return box_iou(torch.from_numpy(gt), torch.from_numpy(pred)).numpy()


def _padded(quality, pad):
    """The matrix with `pad` extra rows of junk, and the validity mask."""
    junk = np.full((pad, quality.shape[1]), 0.9, np.float32)
    valid = np.r_[np.ones(len(quality), bool), np.zeros(pad, bool)]
    return jnp.asarray(np.concatenate([quality, junk])), jnp.asarray(valid)


@pytest.mark.parametrize("high,low,low_quality", [(0.7, 0.3, True), (0.5, 0.5, False),
                                                  (0.5, 0.4, True), (0.6, 0.2, False)])
def test_match_equals_torchvision_matcher(high, low, low_quality):
    jit_match = jax.jit(targets.match, static_argnums=(2, 3, 4))
    for seed in range(4):
        quality = _quality(6, 300, seed)
        expected = tv_utils.Matcher(high, low, low_quality)(torch.from_numpy(quality)).numpy()
        got = jit_match(*_padded(quality, 3), high, low, low_quality)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_ssd_match_equals_torchvision_ssd_matcher():
    for seed in range(4):
        quality = _quality(5, 200, seed)
        quality[:, 17] = quality.max()  # every ground truth's best is one shared prediction
        expected = tv_utils.SSDMatcher(0.5)(torch.from_numpy(quality)).numpy()
        got = jax.jit(targets.ssd_match, static_argnums=2)(*_padded(quality, 2), 0.5)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_no_ground_truth_matches_nothing():
    quality, valid = _padded(np.zeros((0, 40), np.float32), 4)
    for fn in (lambda q, v: targets.match(q, v, 0.7, 0.3, True),
               lambda q, v: targets.ssd_match(q, v, 0.5)):
        np.testing.assert_array_equal(fn(quality, valid), np.full(40, -1))


def test_low_threshold_above_high_raises():
    with pytest.raises(ValueError, match="low_threshold"):
        targets.match(jnp.zeros((1, 3)), jnp.ones(1, bool), 0.3, 0.7)


@pytest.mark.parametrize("num_pos,num_neg", [(10, 1000), (300, 1000), (5, 20), (0, 0)])
def test_sampler_counts_equal_torchvision(num_pos, num_neg):
    labels = np.full(2000, -1, np.int64)
    rng = np.random.default_rng(num_pos)
    picks = rng.permutation(2000)
    labels[picks[:num_pos]] = rng.integers(1, 5, num_pos)
    labels[picks[num_pos:num_pos + num_neg]] = 0
    tv_pos, tv_neg = tv_utils.BalancedPositiveNegativeSampler(256, 0.5)([torch.from_numpy(labels)])
    pos, neg = jax.jit(targets.sample_balanced, static_argnums=(2, 3))(
        jax.random.PRNGKey(num_neg), jnp.asarray(labels), 256, 0.5)
    pos, neg = np.asarray(pos), np.asarray(neg)
    assert (pos.sum(), neg.sum()) == (int(tv_pos[0].sum()), int(tv_neg[0].sum()))
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()


def test_sampler_is_uniform_over_candidates():
    labels = jnp.asarray(np.r_[np.ones(50), np.zeros(50)].astype(np.int32))
    draw = jax.jit(jax.vmap(lambda k: targets.sample_balanced(k, labels, 20, 0.5)))
    pos, neg = draw(jax.random.split(jax.random.PRNGKey(0), 2000))
    freq = np.asarray(pos | neg).mean(0)
    assert np.abs(freq - 0.2).max() < 0.05
