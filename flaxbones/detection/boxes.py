"""Box math on xyxy boxes, written op for op as torchvision's so float32 results agree."""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax


def _int_like(x):
    return jnp.dtype(f"int{jnp.dtype(x.dtype).itemsize * 8}")


@jax.custom_jvp
def no_fma(x):
    """Identity on `x` that XLA cannot contract into a fused multiply-add with the add
    that follows (XLA always lets LLVM fuse a*b+c on CPU/GPU; torch rounds each op), so sums of
    products round bit for bit as torchvision's. i*(i+1) is even for any int32, so z == 0.
    Its derivative is the identity's (the bitcasts alone would make it zero)."""
    i = lax.bitcast_convert_type(x, _int_like(x))
    return lax.bitcast_convert_type(i ^ ((i * (i + 1)) & 1), x.dtype)


@no_fma.defjvp
def _no_fma_jvp(primals, tangents):
    return no_fma(primals[0]), tangents[0]


def div_scalar(x, w):
    """x / w as a true division: XLA turns division by a broadcast scalar into multiplication by
    its reciprocal (off by one ulp from torch's x / w for ~20% of values unless w is a power of 2);
    a per-element divisor, made opaque as in no_fma, keeps the real divide."""
    if isinstance(w, (int, float)) and math.frexp(w)[0] in (0.5, -0.5):
        return x / jnp.asarray(w, x.dtype)
    i = lax.bitcast_convert_type(x, _int_like(x))
    d = lax.bitcast_convert_type(jnp.full(x.shape, w, x.dtype), _int_like(x)) ^ ((i * (i + 1)) & 1)
    return x / lax.bitcast_convert_type(d, x.dtype)


def box_area(boxes):
    """(x2 - x1) * (y2 - y1) over the last axis, as torchvision.ops.box_area (no clamping)."""
    return no_fma((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))


def _inter_union(boxes1, boxes2):
    """Pairwise intersection and union areas, (..., N, M), as torchvision's _box_inter_union."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = no_fma(wh[..., 0] * wh[..., 1])
    return inter, area1[..., :, None] + area2[..., None, :] - inter


def box_iou(boxes1, boxes2):
    """Pairwise IoU of (..., N, 4) and (..., M, 4) boxes -> (..., N, M), torchvision's float math
    (zero-area pairs give NaN, as there)."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalised IoU (..., N, M) as torchvision.ops.generalized_box_iou."""
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / union
    lti = jnp.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rbi = jnp.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    whi = jnp.maximum(rbi - lti, 0)
    areai = no_fma(whi[..., 0] * whi[..., 1])
    return iou - (areai - union) / areai


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """torchvision's BoxCoder: (dx, dy, dw, dh) deltas scaled by `weights`, with dw/dh clamped at
    `bbox_xform_clip` before exp so huge regressions cannot overflow. Any leading dims broadcast."""

    weights: tuple = (1.0, 1.0, 1.0, 1.0)
    bbox_xform_clip: float = math.log(1000.0 / 16)

    def decode(self, codes, boxes):
        """Apply deltas `codes` (..., 4) to reference `boxes` (..., 4) -> xyxy (..., 4)."""
        boxes = boxes.astype(codes.dtype)
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        ctr_x = boxes[..., 0] + no_fma(0.5 * widths)
        ctr_y = boxes[..., 1] + no_fma(0.5 * heights)
        wx, wy, ww, wh = (float(w) for w in self.weights)
        dx, dy = div_scalar(codes[..., 0], wx), div_scalar(codes[..., 1], wy)
        dw = jnp.minimum(div_scalar(codes[..., 2], ww), self.bbox_xform_clip)
        dh = jnp.minimum(div_scalar(codes[..., 3], wh), self.bbox_xform_clip)
        pred_ctr_x = no_fma(dx * widths) + ctr_x
        pred_ctr_y = no_fma(dy * heights) + ctr_y
        half_w = no_fma(0.5 * (jnp.exp(dw) * widths))
        half_h = no_fma(0.5 * (jnp.exp(dh) * heights))
        return jnp.stack([pred_ctr_x - half_w, pred_ctr_y - half_h,
                          pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1)

    def encode(self, matched_gt, boxes):
        """Deltas (..., 4) that take reference `boxes` onto `matched_gt` (torchvision's
        encode_single(reference_boxes=matched_gt, proposals=boxes))."""
        dtype = matched_gt.dtype
        wx, wy, ww, wh = (jnp.asarray(w, dtype) for w in self.weights)
        ex_w = boxes[..., 2] - boxes[..., 0]
        ex_h = boxes[..., 3] - boxes[..., 1]
        ex_x = boxes[..., 0] + no_fma(0.5 * ex_w)
        ex_y = boxes[..., 1] + no_fma(0.5 * ex_h)
        gt_w = matched_gt[..., 2] - matched_gt[..., 0]
        gt_h = matched_gt[..., 3] - matched_gt[..., 1]
        gt_x = matched_gt[..., 0] + no_fma(0.5 * gt_w)
        gt_y = matched_gt[..., 1] + no_fma(0.5 * gt_h)
        return jnp.stack([wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                          ww * jnp.log(gt_w / ex_w), wh * jnp.log(gt_h / ex_h)], axis=-1)


def clip_boxes(boxes, image_sizes):
    """Clamp x to [0, w] and y to [0, h] per image: boxes (N, ..., 4), image_sizes (N, 2) (h, w),
    as torchvision's clip_boxes_to_image applied image by image."""
    sizes = jnp.asarray(image_sizes).astype(boxes.dtype)
    sizes = sizes.reshape(sizes.shape[:1] + (1,) * (boxes.ndim - 2) + (2,))
    hi = jnp.concatenate([sizes[..., ::-1], sizes[..., ::-1]], axis=-1)  # (w, h, w, h)
    return jnp.minimum(jnp.maximum(boxes, 0), hi)


def small_boxes_mask(boxes, min_size):
    """True where both sides are >= min_size (the boxes torchvision's remove_small_boxes keeps)."""
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)
