"""Training targets with static shapes: torchvision's Matcher / SSDMatcher and its
BalancedPositiveNegativeSampler, one image at a time (vmap them over the batch).

Ground truth is padded to a fixed count G with a validity mask; padded rows never match.
"""
import jax
import jax.numpy as jnp

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def _masked_quality(quality, gt_valid):
    """(G, N) quality with padded ground-truth rows at -inf, so they never win a max."""
    return jnp.where(gt_valid[:, None], quality, -jnp.inf)


def match(quality, gt_valid, high_threshold: float, low_threshold: float,
          allow_low_quality_matches: bool = False):
    """torchvision's `Matcher(high, low, allow_low_quality_matches)` on a (G, N) quality
    matrix (IoU of G ground-truth boxes with N predictions) whose rows `gt_valid` (G,) are
    real: (N,) int32 index of the matched ground truth, -1 below `low_threshold`, -2 between.

    Ties go to the lowest ground-truth index (torch's CPU max). An image without valid
    ground truth matches nothing (all -1): torchvision's detectors label such an image all
    background without calling the Matcher.
    """
    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold {low_threshold} must be <= high_threshold "
                         f"{high_threshold}")
    quality = _masked_quality(quality, gt_valid)
    matched_vals = quality.max(0)
    all_matches = jnp.argmax(quality, 0).astype(jnp.int32)
    matches = jnp.where(matched_vals < low_threshold, BELOW_LOW_THRESHOLD,
                        jnp.where(matched_vals < high_threshold, BETWEEN_THRESHOLDS,
                                  all_matches))
    if allow_low_quality_matches:
        best_for_gt = quality.max(1, keepdims=True)
        is_best = (quality == best_for_gt) & gt_valid[:, None]
        matches = jnp.where(is_best.any(0), all_matches, matches)
    return jnp.where(gt_valid.any(), matches, BELOW_LOW_THRESHOLD)


def ssd_match(quality, gt_valid, threshold: float):
    """torchvision's `SSDMatcher(threshold)`: `match(threshold, threshold)`, then each valid
    ground truth claims its best prediction (a later ground truth wins a shared one)."""
    matches = match(quality, gt_valid, threshold, threshold)
    num_gt, num_pred = quality.shape
    best_pred = jnp.argmax(_masked_quality(quality, gt_valid), 1)
    claims = (best_pred[:, None] == jnp.arange(num_pred)[None]) & gt_valid[:, None]  # (G, N)
    last_claim = (num_gt - 1 - jnp.argmax(claims[::-1], 0)).astype(jnp.int32)
    return jnp.where(claims.any(0), last_claim, matches)


def sample_balanced(key, labels, batch_size_per_image: int, positive_fraction: float):
    """torchvision's `BalancedPositiveNegativeSampler` for one image: `labels` (N,) with
    >= 1 positive, 0 negative, < 0 ignored. Draws min(#pos, int(batch * fraction)) positives
    and min(#neg, batch - drawn positives) negatives uniformly without replacement.
    Returns (positive (N,) bool, negative (N,) bool)."""
    positive, negative = labels >= 1, labels == 0
    want_pos = int(batch_size_per_image * positive_fraction)
    num_pos = jnp.minimum(positive.sum(), want_pos)
    num_neg = jnp.minimum(negative.sum(), batch_size_per_image - num_pos)
    key_pos, key_neg = jax.random.split(key)
    return (_draw(key_pos, positive, num_pos), _draw(key_neg, negative, num_neg))


def _draw(key, candidates, count):
    """A uniformly random subset of `count` of the True entries of `candidates`."""
    priority = jnp.where(candidates, jax.random.uniform(key, candidates.shape), -1.0)
    rank = jnp.argsort(jnp.argsort(-priority))
    return candidates & (rank < count)
