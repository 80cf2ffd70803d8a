"""Mask R-CNN and Keypoint R-CNN training targets and losses (torchvision's
project_masks_on_boxes, maskrcnn_loss, keypoints_to_heatmap, keypointrcnn_loss) as pure
functions with static shapes: positives and valid keypoints are masks, not dynamic lengths."""
import math

import jax
import jax.numpy as jnp

from flaxbones.detection.roi_align import _check_method, _roi_align_flat, _roi_align_matmul


def project_masks(gt_masks, boxes, matched_idxs, size: int, sampling_ratio: int | None = None,
                  method: str = "gather"):
    """Each proposal's matched ground-truth mask (G, H, W) RoIAligned to (P, size, size) float32.

    torchvision's project_masks_on_boxes (spatial_scale 1, aligned=False, adaptive sampling);
    the adaptive grid is capped at ceil(H / size) x ceil(W / size), exact for every box no
    taller than H and no wider than W (any box clipped to the image). `sampling_ratio` > 0
    samples a fixed grid instead (faster on big masks; not torchvision's targets). `method`
    "matmul" pools each proposal's own copy of its mask (P x H x W floats: small masks only;
    see `roi_align`)."""
    if gt_masks.ndim != 3 or boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"gt_masks (G, H, W) and boxes (P, 4) expected, got {gt_masks.shape}, "
                         f"{boxes.shape}")
    if sampling_ratio is not None and sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be None (adaptive) or > 0, got {sampling_ratio}")
    _check_method(method)
    g, h, w = gt_masks.shape
    p = boxes.shape[0]
    grid = (max(1, math.ceil(h / size)), max(1, math.ceil(w / size)))
    matched_idxs = jnp.clip(jnp.asarray(matched_idxs).astype(jnp.int32), 0, g - 1)
    if method == "matmul":
        own = jnp.asarray(gt_masks)[matched_idxs].astype(jnp.float32)[..., None]
        out = _roi_align_matmul(own, boxes.astype(jnp.float32)[:, None], 1.0, (size, size),
                                sampling_ratio or -1, False, grid)
        return out[:, 0, ..., 0]
    flat = jnp.asarray(gt_masks).astype(jnp.float32).reshape(g * h * w, 1)
    base = matched_idxs * (h * w)
    out = _roi_align_flat(flat, base, jnp.full((p,), h, jnp.int32), jnp.full((p,), w, jnp.int32),
                          jnp.ones((p,), jnp.float32), boxes.astype(jnp.float32), (size, size),
                          sampling_ratio or -1, False, grid)
    return out[..., 0]


def mask_loss(mask_logits, labels, mask_targets, positive):
    """torchvision's maskrcnn_loss on (N, P, M, M, C) logits: binary cross-entropy of each
    positive RoI's labelled channel, mean over positives x M x M; logits.sum() * 0 if none."""
    if mask_logits.ndim != 5:
        raise ValueError(f"mask_logits (N, P, M, M, C) expected, got {mask_logits.shape}")
    num_classes = mask_logits.shape[-1]
    idx = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, num_classes - 1)
    x = jnp.take_along_axis(mask_logits.astype(jnp.float32), idx[..., None, None, None], -1)[..., 0]
    t = mask_targets.astype(jnp.float32)
    bce = (1.0 - t) * x - jax.nn.log_sigmoid(x)
    pos = jnp.asarray(positive, bool)
    total = jnp.sum(jnp.where(pos[..., None, None], bce, 0.0))
    count = jnp.sum(pos).astype(jnp.float32) * float(x.shape[-2] * x.shape[-1])
    zero = jnp.sum(mask_logits.astype(jnp.float32)) * 0.0
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), zero)


def keypoints_to_heatmap(keypoints, rois, heatmap_size: int):
    """torchvision's keypoints_to_heatmap: each keypoint (P, K, 3) as its flat (y * S + x) cell
    of its roi's S x S heatmap, 0 where invalid (outside the roi or invisible)."""
    if keypoints.ndim != 3 or keypoints.shape[-1] != 3 or rois.shape != (keypoints.shape[0], 4):
        raise ValueError(f"keypoints (P, K, 3) and rois (P, 4) expected, got {keypoints.shape}, "
                         f"{rois.shape}")
    s = heatmap_size
    kp, rois = keypoints.astype(jnp.float32), rois.astype(jnp.float32)
    # torch evaluates `S / t` as t.reciprocal() * S
    scale_x = (1.0 / (rois[:, 2] - rois[:, 0]) * float(s))[:, None]
    scale_y = (1.0 / (rois[:, 3] - rois[:, 1]) * float(s))[:, None]
    x, y = kp[..., 0], kp[..., 1]

    def cell(v, offset, scale, edge):
        f = jnp.floor((v - offset[:, None]) * scale)
        on_edge = v == edge[:, None]
        inside = on_edge | ((f >= 0) & (f < s))  # NaN / huge: torch's .long() is negative
        return jnp.where(on_edge, s - 1, jnp.where(inside, f, 0.0).astype(jnp.int32)), inside

    cx, in_x = cell(x, rois[:, 0], scale_x, rois[:, 2])
    cy, in_y = cell(y, rois[:, 1], scale_y, rois[:, 3])
    valid = in_x & in_y & (kp[..., 2] > 0)
    return jnp.where(valid, cy * s + cx, 0), valid


def keypoint_loss(keypoint_logits, heatmaps, valid, positive):
    """torchvision's keypointrcnn_loss on (N, P, S, S, K) logits: cross-entropy over each
    keypoint's S*S cells (row-major y, x) at its target, mean over valid keypoints of positive
    RoIs; logits.sum() * 0 if none."""
    if keypoint_logits.ndim != 5 or keypoint_logits.shape[2] != keypoint_logits.shape[3]:
        raise ValueError(f"keypoint_logits (N, P, S, S, K) expected, got {keypoint_logits.shape}")
    n, p, s, _, k = keypoint_logits.shape
    logits = jnp.moveaxis(keypoint_logits.astype(jnp.float32).reshape(n, p, s * s, k), -1, -2)
    target = jnp.clip(jnp.asarray(heatmaps).astype(jnp.int32), 0, s * s - 1)
    picked = jnp.take_along_axis(logits, target[..., None], -1)[..., 0]
    ce = jax.nn.logsumexp(logits, -1) - picked
    use = jnp.asarray(valid, bool) & jnp.asarray(positive, bool)[..., None]
    count = jnp.sum(use).astype(jnp.float32)
    total = jnp.sum(jnp.where(use, ce, 0.0))
    zero = jnp.sum(keypoint_logits.astype(jnp.float32)) * 0.0
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), zero)
