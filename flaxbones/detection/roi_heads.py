"""torchvision's RoIHeads (inference): box branch and its postprocessing, and the optional
mask and keypoint branches, with static shapes.

`postprocess_detections` scores every (proposal, class) pair, background dropped, as one
candidate: (N, P * (C - 1)) boxes, masked by proposal validity, `score_thresh` and the 1e-2
minimum size, then per-class NMS keeps the first `detections_per_img` by score.
"""
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.detection.boxes import BoxCoder, clip_boxes, small_boxes_mask
from flaxbones.detection.keypoints import heatmaps_to_keypoints
from flaxbones.detection.nms import batched_nms
from flaxbones.detection.rcnn_heads import select_class
from flaxbones.detection.roi_align import MultiScaleRoIAlign


def postprocess_detections(class_logits, box_regression, proposals, proposal_valid, image_sizes,
                           score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
                           weights=(10.0, 10.0, 5.0, 5.0), min_size=1e-2):
    """class_logits (N, P, C), box_regression (N, P, 4C), proposals (N, P, 4) -> boxes
    (N, K, 4), scores (N, K), labels (N, K) int32, valid (N, K); invalid slots are zero."""
    n, p, c = class_logits.shape
    boxes = BoxCoder(tuple(weights)).decode(
        box_regression.astype(jnp.float32).reshape(n, p, c, 4), proposals[:, :, None, :])
    boxes = clip_boxes(boxes, image_sizes)[:, :, 1:].reshape(n, -1, 4)
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), -1)[:, :, 1:].reshape(n, -1)
    labels = jnp.tile(jnp.arange(1, c, dtype=jnp.int32), p)
    valid = (jnp.repeat(proposal_valid, c - 1, axis=1) & (scores > score_thresh)
             & small_boxes_mask(boxes, min_size))
    nms = partial(batched_nms, iou_threshold=nms_thresh, max_output=detections_per_img)
    keep, kept = jax.vmap(lambda b, s, v: nms(b, s, labels, valid=v))(boxes, scores, valid)
    return (jnp.take_along_axis(boxes, keep[..., None], 1) * kept[..., None],
            jnp.take_along_axis(scores, keep, 1) * kept,
            labels[keep] * kept, kept)


class RoIHeads(nn.Module):
    """Box head + predictor on 7x7 RoIAlign'd proposals, then detections; with `mask_head`
    and `mask_predictor`, per-detection mask probabilities of the detected class
    (N, K, 28, 28) from 14x14 features; with `keypoint_head` and `keypoint_predictor`,
    keypoints (N, K, num_keypoints, 3) and their scores from 56x56 heatmaps.

    RoIAlign reads the FPN levels given to `__call__` (not the extra pooled level) with
    their strides, sampling_ratio 2, aligned=False, torchvision's level mapping. Sows
    `class_logits`, `box_regression`, `mask_logits` and `keypoint_logits`.
    """

    box_head: nn.Module
    box_predictor: nn.Module
    mask_head: nn.Module | None = None
    mask_predictor: nn.Module | None = None
    keypoint_head: nn.Module | None = None
    keypoint_predictor: nn.Module | None = None
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
    box_pool_size: int = 7
    mask_pool_size: int = 14
    keypoint_pool_size: int = 14
    sampling_ratio: int = 2

    def __call__(self, features, strides, proposals, proposal_valid, image_sizes, image_shape,
                 train: bool = False):
        # RoIAlign samples in float32 whatever the compute dtype (bf16 features would also
        # trip roi_align's float32 weights in its loop carry); the heads cast back.
        features = [f.astype(jnp.float32) for f in features]
        pool = lambda size, boxes: MultiScaleRoIAlign(size, self.sampling_ratio)(
            features, list(strides), boxes)
        x = self.box_head(pool(self.box_pool_size, proposals), train=train)
        class_logits, box_regression = self.box_predictor(x)
        self.sow("intermediates", "class_logits", class_logits)
        self.sow("intermediates", "box_regression", box_regression)
        boxes, scores, labels, valid = postprocess_detections(
            class_logits, box_regression, proposals, proposal_valid, image_sizes,
            self.score_thresh, self.nms_thresh, self.detections_per_img, self.bbox_reg_weights)
        out = {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid}
        if self.mask_head is not None:
            logits = self.mask_predictor(self.mask_head(pool(self.mask_pool_size, boxes),
                                                        train=train))
            self.sow("intermediates", "mask_logits", logits)
            out["masks"] = jax.nn.sigmoid(select_class(logits.astype(jnp.float32), labels))
            out["masks"] = out["masks"] * valid[..., None, None]
        if self.keypoint_head is not None:
            maps = self.keypoint_predictor(self.keypoint_head(
                pool(self.keypoint_pool_size, boxes), train=train))
            self.sow("intermediates", "keypoint_logits", maps)
            n, k, h, w, joints = maps.shape
            maps = jnp.moveaxis(maps.astype(jnp.float32), -1, 2).reshape(n * k, joints, h, w)
            points, point_scores = heatmaps_to_keypoints(maps, boxes.reshape(-1, 4),
                                                         tuple(image_shape))
            out["keypoints"] = points.reshape(n, k, *points.shape[1:]) * valid[..., None, None]
            out["keypoint_scores"] = point_scores.reshape(n, k, -1) * valid[..., None]
        return out
