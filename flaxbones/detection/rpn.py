"""Region Proposal Network: torchvision's RPNHead and RegionProposalNetwork (inference and
training: anchor matching, balanced sampling and its two losses).

Static shapes throughout: the per-level top-n before NMS is min(pre_nms_top_n, anchors of
that level), known at trace time, and the proposals are a fixed (N, P, 4) array with a
validity mask (P = min(post_nms_top_n, the candidates)), valid ones first by descending
objectness, as torchvision's per-image lists.
"""
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.detection import targets as tg
from flaxbones.detection.anchors import AnchorGenerator
from flaxbones.detection.boxes import BoxCoder, box_iou, clip_boxes, small_boxes_mask
from flaxbones.detection.nms import batched_nms
from flaxbones.detection.rcnn_losses import rpn_loss
from flaxbones.layers import ConvNormModule, normal_001


class RPNHead(ConvNormModule):
    """`conv_depth` 3x3 conv+ReLU (`conv_i`, 1 in v1, 2 in v2) shared by every level, then 1x1
    `cls_logits` (A) and `bbox_pred` (4A). Per level: objectness (N, h*w*A) and deltas
    (N, h*w*A, 4) in torchvision's order (location-major, anchor-minor)."""

    num_anchors: int
    conv_depth: int = 1

    conv_init = staticmethod(normal_001)  # torchvision: N(0, 0.01), zero bias

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]):
        conv = self.conv_def(use_bias=True)
        width = features[0].shape[-1]
        convs = [conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f"conv_{i}")
                 for i in range(self.conv_depth)]
        cls = conv(self.num_anchors, (1, 1), name="cls_logits")
        box = conv(4 * self.num_anchors, (1, 1), name="bbox_pred")
        objectness, deltas = [], []
        for x in features:
            for c in convs:
                x = nn.relu(c(x))
            n = x.shape[0]
            objectness.append(cls(x).reshape(n, -1))
            deltas.append(box(x).reshape(n, -1, 4))
        return objectness, deltas


class RPN(ConvNormModule):
    """Proposals from FPN levels: the head, anchors, decode, per-level top-n, clip,
    small-box (< `min_size`) and `score_thresh` filters as masks, NMS per level at
    `nms_thresh`, `post_nms_top_n` per image (`*_train` in train mode), torchvision's
    settings.

    Returns (proposals (N, P, 4) xyxy, valid (N, P) bool, scores (N, P) sigmoid objectness);
    invalid slots are zero. Sows the head's raw `objectness` and `deltas` (lists per level).
    With `train=True` and ground truth `gt_boxes` (N, G, 4) / `gt_valid` (N, G) it also returns
    torchvision's `loss_objectness` and `loss_rpn_box_reg` (a dict; anchors matched at
    `fg_iou_thresh` / `bg_iou_thresh` with low-quality matches, `batch_size_per_image` anchors
    sampled per image with `positive_fraction`, rng 'sampling'); proposals carry no gradient.
    """

    anchor_generator: AnchorGenerator = AnchorGenerator()
    conv_depth: int = 1
    pre_nms_top_n: int = 1000
    post_nms_top_n: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 1e-3
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 2000
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], image_shape, image_sizes,
                 train: bool = False, gt_boxes=None, gt_valid=None):
        counts = set(self.anchor_generator.num_anchors_per_location())
        if len(counts) != 1:
            raise ValueError(f"one RPN head needs the same number of anchors per location on "
                             f"every level; the anchor generator gives {sorted(counts)}")
        head = RPNHead(counts.pop(), self.conv_depth, dtype=self.dtype,
                       param_dtype=self.param_dtype, cpu_kernels=self.cpu_kernels, name="head")
        objectness, deltas = head(features)
        self.sow("intermediates", "objectness", objectness)
        self.sow("intermediates", "deltas", deltas)
        anchors = self.anchor_generator(tuple(image_shape), [f.shape[1:3] for f in features])
        anchors = jnp.asarray(np.concatenate(anchors, 0))
        all_deltas = jnp.concatenate(deltas, 1).astype(jnp.float32)
        all_logits = jnp.concatenate(objectness, 1).astype(jnp.float32)
        boxes = BoxCoder().decode(jax.lax.stop_gradient(all_deltas), anchors)
        pre, post = ((self.pre_nms_top_n_train, self.post_nms_top_n_train) if train else
                     (self.pre_nms_top_n, self.post_nms_top_n))
        top, levels = self._top_n(objectness, pre)
        logits = jnp.take_along_axis(jax.lax.stop_gradient(all_logits), top, 1)
        boxes = clip_boxes(jnp.take_along_axis(boxes, top[..., None], 1), image_sizes)
        scores = jax.nn.sigmoid(logits)
        valid = small_boxes_mask(boxes, self.min_size) & (scores >= self.score_thresh)
        keep_n = min(post, top.shape[1])
        nms = partial(batched_nms, iou_threshold=self.nms_thresh, max_output=keep_n)
        keep, kept = jax.vmap(lambda b, s, v: nms(b, s, levels, valid=v))(boxes, scores, valid)
        proposals = jnp.take_along_axis(boxes, keep[..., None], 1) * kept[..., None]
        out = (proposals, kept, jnp.take_along_axis(scores, keep, 1) * kept)
        if not train:
            return out
        return out + (self._losses(all_logits, all_deltas, anchors, gt_boxes, gt_valid),)

    def _losses(self, objectness, deltas, anchors, gt_boxes, gt_valid):
        """torchvision's assign_targets_to_anchors, fg_bg_sampler and compute_loss."""
        def per_image(key, boxes, valid):
            matches = tg.match(box_iou(boxes, anchors), valid, self.fg_iou_thresh,
                               self.bg_iou_thresh, allow_low_quality_matches=True)
            labels = jnp.where(matches >= 0, 1, jnp.where(matches == tg.BELOW_LOW_THRESHOLD,
                                                          0, -1))
            positive, negative = tg.sample_balanced(key, labels, self.batch_size_per_image,
                                                    self.positive_fraction)
            target = BoxCoder().encode(boxes[jnp.maximum(matches, 0)], anchors)
            return labels, target, positive, negative

        keys = jax.random.split(self.make_rng("sampling"), gt_boxes.shape[0])
        labels, target, positive, negative = jax.vmap(per_image)(
            keys, gt_boxes.astype(jnp.float32), gt_valid)
        loss_objectness, loss_box = rpn_loss(objectness, deltas, labels, target, positive,
                                             negative)
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    @staticmethod
    def _top_n(objectness, pre_nms_top_n: int):
        """Indices (N, sum_l k_l) of each level's k_l = min(pre_nms_top_n, anchors) best
        logits (descending), into the concatenated levels, and the level of each (numpy)."""
        picks, levels, offset = [], [], 0
        for lvl, obj in enumerate(objectness):
            k = min(pre_nms_top_n, obj.shape[1])
            picks.append(jax.lax.top_k(obj.astype(jnp.float32), k)[1] + offset)
            levels.append(np.full(k, lvl, np.int32))
            offset += obj.shape[1]
        return jnp.concatenate(picks, 1), jnp.asarray(np.concatenate(levels))
