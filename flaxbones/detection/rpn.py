"""Region Proposal Network: torchvision's RPNHead and RegionProposalNetwork (inference).

Static shapes throughout: the per-level top-n before NMS is min(pre_nms_top_n, anchors of
that level), known at trace time, and the proposals are a fixed (N, P, 4) array with a
validity mask (P = min(post_nms_top_n, the candidates)), valid ones first by descending
objectness, as torchvision's per-image lists.
"""
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.detection.anchors import AnchorGenerator
from flaxbones.detection.boxes import BoxCoder, clip_boxes, small_boxes_mask
from flaxbones.detection.nms import batched_nms
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
    `nms_thresh`, `post_nms_top_n` per image. torchvision's test-mode settings.

    Returns (proposals (N, P, 4) xyxy, valid (N, P) bool, scores (N, P) sigmoid objectness);
    invalid slots are zero. Sows the head's raw `objectness` and `deltas` (lists per level).
    """

    anchor_generator: AnchorGenerator = AnchorGenerator()
    conv_depth: int = 1
    pre_nms_top_n: int = 1000
    post_nms_top_n: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 1e-3

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], image_shape, image_sizes):
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
        boxes = BoxCoder().decode(jnp.concatenate(deltas, 1).astype(jnp.float32),
                                  jnp.asarray(np.concatenate(anchors, 0)))
        top, levels = self._top_n(objectness)
        logits = jnp.take_along_axis(jnp.concatenate(objectness, 1).astype(jnp.float32), top, 1)
        boxes = clip_boxes(jnp.take_along_axis(boxes, top[..., None], 1), image_sizes)
        scores = jax.nn.sigmoid(logits)
        valid = small_boxes_mask(boxes, self.min_size) & (scores >= self.score_thresh)
        keep_n = min(self.post_nms_top_n, top.shape[1])
        nms = partial(batched_nms, iou_threshold=self.nms_thresh, max_output=keep_n)
        keep, kept = jax.vmap(lambda b, s, v: nms(b, s, levels, valid=v))(boxes, scores, valid)
        proposals = jnp.take_along_axis(boxes, keep[..., None], 1) * kept[..., None]
        return proposals, kept, jnp.take_along_axis(scores, keep, 1) * kept

    def _top_n(self, objectness):
        """Indices (N, sum_l k_l) of each level's k_l = min(pre_nms_top_n, anchors) best
        logits (descending), into the concatenated levels, and the level of each (numpy)."""
        picks, levels, offset = [], [], 0
        for lvl, obj in enumerate(objectness):
            k = min(self.pre_nms_top_n, obj.shape[1])
            picks.append(jax.lax.top_k(obj.astype(jnp.float32), k)[1] + offset)
            levels.append(np.full(k, lvl, np.int32))
            offset += obj.shape[1]
        return jnp.concatenate(picks, 1), jnp.asarray(np.concatenate(levels))
