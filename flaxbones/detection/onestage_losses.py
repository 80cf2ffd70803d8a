"""The one-stage detectors' training losses as torchvision computes them (RetinaNet, FCOS, SSD):
matching, focal / GIoU / centerness / smooth-L1 / hard-negative-mined cross-entropy terms, with
static shapes (padded ground truth and masks), float32, one image at a time vmapped over the
batch."""
import jax
import jax.numpy as jnp
import numpy as np

from flaxbones.detection.boxes import BoxCoder, box_iou
from flaxbones.detection.targets import BETWEEN_THRESHOLDS, match, ssd_match


def check_targets(targets, batch: int, num_classes: int):
    """(boxes (N, G, 4) float32, labels (N, G) int32, instance_valid (N, G) bool) from the
    padded `targets` dict (else a TypeError); a ValueError names a missing key, a wrong shape
    or dtype, and (when concrete) a valid box without positive width and height or a label
    outside [0, num_classes). Extra keys (masks, keypoints) are ignored. G = 0 becomes one padded row."""
    if not isinstance(targets, dict):
        raise TypeError(f"targets must be a dict with 'boxes', 'labels', 'instance_valid'; got "
                        f"{type(targets).__name__}")
    missing = [k for k in ("boxes", "labels", "instance_valid") if k not in targets]
    if missing:
        raise ValueError(f"targets lack {missing}; they have {sorted(targets)}")
    boxes, labels, valid = targets["boxes"], targets["labels"], targets["instance_valid"]
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(f"targets['boxes'] must be (N={batch}, G, 4) xyxy, got {boxes.shape}")
    g = boxes.shape[1]
    for key, x in (("labels", labels), ("instance_valid", valid)):
        if x.shape != (batch, g):
            raise ValueError(f"targets[{key!r}] must be (N, G) = {(batch, g)} like the boxes, "
                             f"got {x.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"targets['labels'] must be integers, got dtype {labels.dtype}")
    if not any(isinstance(x, jax.core.Tracer) for x in (boxes, labels, valid)):
        b, lab, ok = np.asarray(boxes), np.asarray(labels), np.asarray(valid, bool)
        flat = (b[..., 2:] <= b[..., :2]).any(-1) & ok
        if flat.any():
            i, j = np.argwhere(flat)[0]
            raise ValueError(f"every valid ground-truth box needs positive width and height; "
                             f"image {i} box {j} is {b[i, j].tolist()}")
        bad = ((lab < 0) | (lab >= num_classes)) & ok
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"targets['labels'] must lie in [0, {num_classes}); image {i} "
                             f"instance {j} has {int(lab[i, j])}")
    boxes, labels = jnp.asarray(boxes, jnp.float32), jnp.asarray(labels, jnp.int32)
    valid = jnp.asarray(valid, bool)
    if g == 0:
        boxes, labels = jnp.zeros((batch, 1, 4)), jnp.zeros((batch, 1), jnp.int32)
        valid = jnp.zeros((batch, 1), bool)
    return boxes, labels, valid


def bce_with_logits(x, t):
    """F.binary_cross_entropy_with_logits, elementwise."""
    return (1 - t) * x - jax.nn.log_sigmoid(x)


def sigmoid_focal_loss(x, t, alpha: float = 0.25, gamma: float = 2.0):
    """torchvision.ops.sigmoid_focal_loss, elementwise."""
    p = jax.nn.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = bce_with_logits(x, t) * (1 - p_t) ** gamma
    return (alpha * t + (1 - alpha) * (1 - t)) * loss


def giou_loss(boxes1, boxes2, eps: float = 1e-7):
    """torchvision.ops.generalized_box_iou_loss of paired (..., 4) boxes, elementwise."""
    x1, y1, x2, y2 = jnp.moveaxis(boxes1, -1, 0)
    x1g, y1g, x2g, y2g = jnp.moveaxis(boxes2, -1, 0)
    iw = jnp.minimum(x2, x2g) - jnp.maximum(x1, x1g)
    ih = jnp.minimum(y2, y2g) - jnp.maximum(y1, y1g)
    inter = jnp.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    area_c = (jnp.maximum(x2, x2g) - jnp.minimum(x1, x1g)) * (
        jnp.maximum(y2, y2g) - jnp.minimum(y1, y1g))
    return 1 - (inter / (union + eps) - (area_c - union) / (area_c + eps))


def decode_deltas(codes, anchors, weights, clip: float = BoxCoder.bbox_xform_clip):
    """BoxCoder(weights).decode_single with plain float ops: differentiable (boxes.BoxCoder's
    bit-exact no_fma / div_scalar are bitcasts, whose gradient JAX makes zero)."""
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ctr_x, ctr_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = codes[:, 0] / wx, codes[:, 1] / wy
    dw, dh = jnp.minimum(codes[:, 2] / ww, clip), jnp.minimum(codes[:, 3] / wh, clip)
    x, y = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = 0.5 * (jnp.exp(dw) * widths), 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=-1)


def smooth_l1(x, beta: float = 1.0):
    """F.smooth_l1_loss of a difference `x`, elementwise."""
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _matched(matched, boxes, labels, anchors):
    """(foreground mask, matched boxes (anchors where background: finite losses), labels)."""
    fg = matched >= 0
    index = jnp.maximum(matched, 0)
    return fg, jnp.where(fg[:, None], boxes[index], anchors), labels[index]


def _masked_sum(x, mask):
    return jnp.where(mask, x, 0.0).sum()


# --- RetinaNet ---

def retinanet_image_loss(logits, codes, anchors, boxes, labels, valid, bbox_loss: str):
    """One image's (classification, bbox_regression), each / max(1, foreground): Matcher(0.5,
    0.4, low-quality matches) on IoU, focal loss over the anchors not between thresholds, L1 on
    BoxCoder((1, 1, 1, 1)) deltas or GIoU on decoded boxes over the foreground."""
    matched = match(box_iou(boxes, anchors), valid, 0.5, 0.4, allow_low_quality_matches=True)
    fg, gt, gt_labels = _matched(matched, boxes, labels, anchors)
    onehot = jax.nn.one_hot(gt_labels, logits.shape[-1]) * fg[:, None]
    cls = _masked_sum(sigmoid_focal_loss(logits, onehot),
                      (matched != BETWEEN_THRESHOLDS)[:, None])
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    if bbox_loss == "l1":
        per_anchor = jnp.abs(codes - coder.encode(gt, anchors)).sum(-1)
    elif bbox_loss == "giou":
        per_anchor = giou_loss(decode_deltas(codes, anchors, coder.weights), gt)
    else:
        raise ValueError(f"RetinaNet bbox_loss must be 'l1' or 'giou', got {bbox_loss!r}")
    count = jnp.maximum(1, fg.sum())
    return cls / count, _masked_sum(per_anchor, fg) / count


def retinanet_loss(logits, codes, anchors, boxes, labels, valid, bbox_loss: str = "l1") -> dict:
    """torchvision's RetinaNet loss dict: per-image terms averaged over the batch."""
    cls, box = jax.vmap(retinanet_image_loss, (0, 0, None, 0, 0, 0, None))(
        logits, codes, anchors, boxes, labels, valid, bbox_loss)
    return {"classification": cls.mean(), "bbox_regression": box.mean()}


# --- FCOS ---

def fcos_match(anchors, boxes, valid, level_counts, radius: float = 1.5):
    """torchvision's FCOS assignment for one image: (A,) index of the matched ground truth or
    -1. An anchor takes the smallest-area valid box whose centre lies within `radius` anchor
    sizes of it, that contains its centre, and whose largest side distance fits the level's
    range (4x, 8x the anchor size; open at the first and last level)."""
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2] - anchors[:, 0]
    ok = jnp.abs(anchor_centers[:, None] - centers[None]).max(2) < radius * sizes[:, None]
    x, y = anchor_centers[:, 0:1], anchor_centers[:, 1:2]
    dist = jnp.stack([x - boxes[None, :, 0], y - boxes[None, :, 1],
                      boxes[None, :, 2] - x, boxes[None, :, 3] - y], axis=2)
    ok &= dist.min(2) > 0
    first, last = level_counts[0], anchors.shape[0] - level_counts[-1]
    position = jnp.arange(anchors.shape[0])
    lower = jnp.where(position < first, 0.0, sizes * 4)
    upper = jnp.where(position >= last, jnp.inf, sizes * 8)
    far = dist.max(2)
    ok &= (far > lower[:, None]) & (far < upper[:, None]) & valid[None]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    score = ok.astype(jnp.float32) * (jnp.float32(1e8) - areas[None])
    return jnp.where(score.max(1) < 1e-5, -1, jnp.argmax(score, 1)).astype(jnp.int32)


def fcos_loss(logits, codes, ctrness, anchors, boxes, labels, valid, level_counts,
              radius: float = 1.5, decode=None) -> dict:
    """torchvision's FCOS loss dict: focal loss over every anchor, GIoU of the decoded boxes and
    centerness BCE over the foreground, all / max(1, foreground of the batch). `decode(codes,
    anchors)` is the detector's decoding (None: torchvision's BoxLinearCoder)."""
    if decode is None:
        from flaxbones.detection.fcos import linear_decode as decode

    def image(logits, codes, ctrness, boxes, labels, valid):
        matched = fcos_match(anchors, boxes, valid, level_counts, radius)
        fg, gt, gt_labels = _matched(matched, boxes, labels, anchors)
        onehot = jax.nn.one_hot(gt_labels, logits.shape[-1]) * fg[:, None]
        cls = sigmoid_focal_loss(logits, onehot).sum()
        box = _masked_sum(giou_loss(decode(codes, anchors), gt), fg)
        cx = 0.5 * (anchors[:, 0] + anchors[:, 2])
        cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
        w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        left, top = (cx - gt[:, 0]) / w, (cy - gt[:, 1]) / h
        right, bottom = (gt[:, 2] - cx) / w, (gt[:, 3] - cy) / h
        target = jnp.sqrt(jnp.minimum(left, right) / jnp.maximum(left, right)
                          * (jnp.minimum(top, bottom) / jnp.maximum(top, bottom)))
        target = jnp.where(fg, target, 0.0)
        ctr = _masked_sum(bce_with_logits(ctrness[:, 0], target), fg)
        return cls, box, ctr, fg.sum()

    cls, box, ctr, count = jax.vmap(image)(logits, codes, ctrness, boxes, labels, valid)
    count = jnp.maximum(1, count.sum())
    return {"classification": cls.sum() / count, "bbox_regression": box.sum() / count,
            "bbox_ctrness": ctr.sum() / count}


# --- SSD ---

def ssd_image_loss(logits, codes, anchors, boxes, labels, valid, iou_thresh: float,
                   neg_to_pos_ratio: float):
    """One image's (box loss sum, classification loss sum, foreground count): SSDMatcher,
    smooth-L1 on BoxCoder((10, 10, 5, 5)) deltas, softmax cross-entropy over the foreground
    and the `neg_to_pos_ratio` x foreground negatives of highest loss (torchvision's stable
    descending sort: ties to the lower anchor index)."""
    matched = ssd_match(box_iou(boxes, anchors), valid, iou_thresh)
    fg, gt, gt_labels = _matched(matched, boxes, labels, anchors)
    target = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gt, anchors)
    box = _masked_sum(smooth_l1(codes - target).sum(-1), fg)
    classes = jnp.where(fg, gt_labels, 0)
    ce = (jax.nn.logsumexp(logits, -1)
          - jnp.take_along_axis(logits, classes[:, None], -1)[:, 0])
    positive = classes > 0
    negative_loss = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(ce))
    order = jnp.argsort(-negative_loss, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    hard = rank < neg_to_pos_ratio * positive.sum()
    return box, _masked_sum(ce, positive) + _masked_sum(ce, hard), fg.sum()


def ssd_loss(logits, codes, anchors, boxes, labels, valid, iou_thresh: float = 0.5,
             neg_to_pos_ratio: float = 3.0) -> dict:
    """torchvision's SSD loss dict: both sums over the batch / max(1, foreground)."""
    box, cls, count = jax.vmap(ssd_image_loss, (0, 0, None, 0, 0, 0, None, None))(
        logits, codes, anchors, boxes, labels, valid, iou_thresh, neg_to_pos_ratio)
    count = jnp.maximum(1, count.sum())
    return {"bbox_regression": box.sum() / count, "classification": cls.sum() / count}


__all__ = ["bce_with_logits", "check_targets", "decode_deltas", "fcos_loss", "fcos_match", "giou_loss",
           "retinanet_image_loss", "retinanet_loss", "sigmoid_focal_loss", "smooth_l1",
           "ssd_image_loss", "ssd_loss"]
