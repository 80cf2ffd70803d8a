"""torchvision's RoIHeads: box branch and its postprocessing, and the optional mask and
keypoint branches, with static shapes; in training, its proposal sampling and losses.

`postprocess_detections` scores every (proposal, class) pair, background dropped, as one
candidate: (N, P * (C - 1)) boxes, masked by proposal validity, `score_thresh` and the 1e-2
minimum size, then per-class NMS keeps the first `detections_per_img` by score.
"""
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.detection import instance_targets as it
from flaxbones.detection import targets as tg
from flaxbones.detection.boxes import BoxCoder, box_iou, clip_boxes, small_boxes_mask
from flaxbones.detection.keypoints import heatmaps_to_keypoints
from flaxbones.detection.nms import batched_nms
from flaxbones.detection.rcnn_heads import select_class
from flaxbones.detection.rcnn_losses import fastrcnn_loss
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


def sample_rois(key, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, fg_iou_thresh,
                bg_iou_thresh, batch_size_per_image, positive_fraction):
    """torchvision's select_training_samples for one image, into a fixed number of slots
    S = min(batch_size_per_image, P + G), positives first: the proposals (P, 4) plus the valid
    ground truth (add_gt_proposals), matched (invalid slots neither positive nor negative)
    and balanced-sampled. Returns rois (S, 4), labels (S,) (0 background), matched ground
    truth index (S,), positive (S,) and sampled (S,) bool."""
    boxes = jnp.concatenate([proposals, gt_boxes], 0)
    valid = jnp.concatenate([proposal_valid, gt_valid], 0)
    matches = tg.match(box_iou(gt_boxes, boxes), gt_valid, fg_iou_thresh, bg_iou_thresh)
    matches = jnp.where(valid, matches, tg.BETWEEN_THRESHOLDS)
    matched = jnp.maximum(matches, 0)
    labels = jnp.where(matches >= 0, gt_labels[matched],
                       jnp.where(matches == tg.BELOW_LOW_THRESHOLD, 0, -1))
    positive, negative = tg.sample_balanced(key, labels, batch_size_per_image,
                                            positive_fraction)
    slots = min(batch_size_per_image, boxes.shape[0])
    order = jnp.argsort(jnp.where(positive, 0, jnp.where(negative, 1, 2)), stable=True)[:slots]
    sampled = (positive | negative)[order]
    return (boxes[order], jnp.where(sampled, labels[order], 0).astype(jnp.int32),
            matched[order], positive[order], sampled)


class RoIHeads(nn.Module):
    """Box head + predictor on 7x7 RoIAlign'd proposals, then detections; with `mask_head`
    and `mask_predictor`, per-detection mask probabilities of the detected class
    (N, K, 28, 28) from 14x14 features; with `keypoint_head` and `keypoint_predictor`,
    keypoints (N, K, num_keypoints, 3) and their scores from 56x56 heatmaps.

    RoIAlign reads the FPN levels given to `__call__` (not the extra pooled level) with
    their strides, sampling_ratio 2, aligned=False, torchvision's level mapping. Sows
    `class_logits`, `box_regression`, `mask_logits` and `keypoint_logits` (in training also
    `sampled_rois`, `sampled_positive` and `sampled`).

    `train=True` with `targets` (the detector's batched dict) returns torchvision's losses:
    `loss_classifier`, `loss_box_reg` on min(batch_size_per_image, P + G) RoIs per image
    (sampled with rng 'sampling'), `loss_mask` / `loss_keypoint` on the first
    int(batch_size_per_image * positive_fraction) of them (where the positives are), or on
    a uniform random subset of at most `positive_rois_per_image` positives (static shapes make
    the mask and keypoint heads pay for every slot; torchvision's loss is the mean over all
    positives: the subset's mean estimates it without bias within an image, while an image
    with more than K positives weighs K in the batch mean). Heads
    with BatchNorm (v2) take train-mode statistics over the sampled RoIs only (the box head)
    and the positive ones only (the mask head), as torchvision's, whose tensors hold only
    those: each head gets its slots' validity as `mask`.
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
    roi_align: str = "gather"
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    positive_rois_per_image: int | None = None

    def __call__(self, features, strides, proposals, proposal_valid, image_sizes, image_shape,
                 train: bool = False, targets=None):
        # RoIAlign samples in float32 whatever the compute dtype (bf16 features would also
        # trip roi_align's float32 weights in its loop carry); the heads cast back.
        features = [f.astype(jnp.float32) for f in features]
        pool = lambda size, boxes: MultiScaleRoIAlign(size, self.sampling_ratio,
                                                              method=self.roi_align)(
            features, list(strides), boxes)
        if train:
            return self._losses(pool, proposals, proposal_valid, targets)
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

    def _losses(self, pool, proposals, proposal_valid, targets):
        """Sampled RoIs through every branch, and their losses (torchvision's names)."""
        gt_boxes = targets["boxes"].astype(jnp.float32)
        keys = jax.random.split(self.make_rng("sampling"), proposals.shape[0])
        sample = partial(sample_rois, fg_iou_thresh=self.fg_iou_thresh,
                         bg_iou_thresh=self.bg_iou_thresh,
                         batch_size_per_image=self.batch_size_per_image,
                         positive_fraction=self.positive_fraction)
        rois, labels, matched, positive, sampled = jax.vmap(sample)(
            keys, jax.lax.stop_gradient(proposals), proposal_valid, gt_boxes,
            targets["labels"], targets["instance_valid"])
        self.sow("intermediates", "sampled_rois", rois)
        self.sow("intermediates", "sampled_positive", positive)
        self.sow("intermediates", "sampled", sampled)
        x = self.box_head(pool(self.box_pool_size, rois), train=True, mask=sampled)
        class_logits, box_regression = self.box_predictor(x)
        self.sow("intermediates", "class_logits", class_logits)
        self.sow("intermediates", "box_regression", box_regression)
        matched_boxes = jnp.take_along_axis(gt_boxes, matched[..., None], 1)
        regression_targets = BoxCoder(tuple(self.bbox_reg_weights)).encode(matched_boxes, rois)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels,
                                                      regression_targets, sampled)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.mask_head is None and self.keypoint_head is None:
            return losses
        slots = min(int(self.batch_size_per_image * self.positive_fraction), rois.shape[1])
        take = jnp.arange(slots)[None]
        if self.positive_rois_per_image is not None and self.positive_rois_per_image < slots:
            # a uniform random subset of the positives (they fill the first slots in order)
            draw = jax.random.uniform(self.make_rng("sampling"), positive[:, :slots].shape)
            rank = jnp.where(positive[:, :slots], draw, 2.0)
            take = jnp.argsort(rank, axis=1)[:, :self.positive_rois_per_image]
        pick = lambda a: jnp.take_along_axis(a[:, :slots], take.reshape(
            take.shape + (1,) * (a.ndim - 2)), 1)
        rois, labels, matched, positive = map(pick, (rois, labels, matched, positive))
        if self.mask_head is not None:
            logits = self.mask_predictor(self.mask_head(pool(self.mask_pool_size, rois),
                                                        train=True, mask=positive))
            self.sow("intermediates", "mask_logits", logits)
            size = logits.shape[2]
            project = partial(it.project_masks, size=size, method=self.roi_align)
            mask_targets = jax.vmap(project)(
                targets["masks"], rois, matched)
            losses["loss_mask"] = it.mask_loss(logits, labels, mask_targets, positive)
        if self.keypoint_head is not None:
            logits = self.keypoint_predictor(self.keypoint_head(
                pool(self.keypoint_pool_size, rois), train=True, mask=positive))
            self.sow("intermediates", "keypoint_logits", logits)
            size = logits.shape[2]
            points = jnp.take_along_axis(targets["keypoints"].astype(jnp.float32),
                                         matched[..., None, None], 1)
            heatmaps, valid = jax.vmap(lambda k, b: it.keypoints_to_heatmap(k, b, size))(
                points, rois)
            losses["loss_keypoint"] = it.keypoint_loss(logits, heatmaps, valid, positive)
        return losses
