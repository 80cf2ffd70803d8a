"""What the one-stage detectors (RetinaNet, FCOS, SSD) share: the dense head towers, head
outputs flattened as torchvision orders them, static-shape candidate selection and the final
batched NMS."""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.detection.base import (
    backbone_frozen_patterns,
    check_detector_inputs,
    default_image_sizes,
    frozen_bn_patterns,
)
from flaxbones.detection.boxes import clip_boxes
from flaxbones.detection.nms import batched_nms


def empty_detections(batch: int, detections: int) -> dict:
    """The output structure with no detection: what `init` returns, since the postprocess
    holds no parameters and is costly to compile."""
    return {"boxes": jnp.zeros((batch, detections, 4)), "scores": jnp.zeros((batch, detections)),
            "labels": jnp.zeros((batch, detections), jnp.int32),
            "valid": jnp.zeros((batch, detections), bool)}


def flatten_level(x, columns: int):
    """(N, H, W, A * columns) conv output -> (N, H * W * A, columns): torchvision's
    `view(N, A, columns, H, W).permute(0, 3, 4, 1, 2)` order, which NHWC already has."""
    n, h, w, c = x.shape
    return x.reshape(n, h * w * (c // columns), columns)


class DenseBranch(nn.Module):
    """`num_convs` 3x3 conv [-norm] -ReLU layers (`conv_i`, `norm_i`; the convs biased unless
    `tower_bias` is False), then one biased 3x3 conv per entry of `outputs` ((name, channels,
    bias init)); one instance serves every level, so the weights are shared across levels as
    in RetinaNet's and FCOS's heads. `conv` is a Conv constructor."""

    channels: int
    outputs: Sequence[tuple[str, int, Callable]]
    conv: Any
    norm: Any = None
    num_convs: int = 4
    tower_bias: bool = True

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1))
        for i in range(self.num_convs):
            x = self.conv(self.channels, (3, 3), padding=pad, use_bias=self.tower_bias,
                          name=f"conv_{i}")(x)
            if self.norm is not None:
                x = self.norm(name=f"norm_{i}")(x)
            x = nn.relu(x)
        return tuple(self.conv(c, (3, 3), padding=pad, use_bias=True, bias_init=init, name=name)(x)
                     for name, c, init in self.outputs)


def group_norm(groups: int, dtype, param_dtype):
    """torch.nn.GroupNorm(groups, C) (eps 1e-5, two-pass variance)."""
    return lambda name: nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False,
                                     dtype=dtype, param_dtype=param_dtype, name=name)


def top_candidates(scores, score_thresh: float, topk: int):
    """torchvision's `scores > thresh` then `topk(min(topk, kept))`, static: (values, indices
    into `scores`, valid) of the `min(topk, len(scores))` best; slots past the kept count are
    invalid. Ties go to the lower index."""
    masked = jnp.where(scores > score_thresh, scores, -jnp.inf)
    values, index = jax.lax.top_k(masked, min(topk, scores.shape[0]))
    return values, index, values > score_thresh


def final_detections(boxes, scores, labels, valid, nms_thresh: float, detections: int) -> dict:
    """Per-class NMS of one image's candidates, the best `detections` kept: fixed-size
    `boxes`, `scores`, `labels` (int32), `valid`, valid first by descending score; invalid
    slots hold zeros."""
    keep, kept = batched_nms(boxes, scores, labels, nms_thresh, detections, valid)
    def zero(x):
        return jnp.where(kept.reshape(kept.shape + (1,) * (x.ndim - 1)), x[keep], 0)

    return {"boxes": zero(boxes), "scores": zero(scores),
            "labels": zero(labels).astype(jnp.int32), "valid": kept}


class DenseDetector(nn.Module):
    """Backbone -> FPN `neck` -> dense `head` -> per-level top-k of the scores above
    `score_thresh` -> decoded, clipped boxes -> per-class NMS (RetinaNet, FCOS).

    `__call__(images (N, H, W, 3), image_sizes (N, 2) int (None: the full padded size),
    train=False, targets=None)` returns fixed-size `boxes` (N, K, 4) xyxy in the padded frame,
    `scores`, `labels` (int32), `valid` (N, K) with K = `detections_per_img`; invalid slots
    are zeros.
    Sown "intermediates": the pyramid levels (`P3`, ...), the head's raw outputs concatenated
    over levels as torchvision returns them, and the anchors. Subclasses give `level_scores`
    and `decode` (and `loss` for training). `frozen_param_patterns()` is torchvision's trainable_backbone_layers.
    `init` sows nothing and skips the postprocess (no parameters): empty detections.
    With train=True and padded `targets` ('boxes' (N, G, 4) xyxy in the padded frame, 'labels',
    'instance_valid' (N, G)) it returns torchvision's loss dict instead (subclasses' `loss`).
    """

    backbone: nn.Module
    neck: nn.Module
    head: nn.Module
    anchor_generator: Any
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    topk_candidates: int = 1000
    trainable_layers: int | None = None

    def frozen_param_patterns(self) -> tuple[str, ...]:
        """Param-path regexes torchvision would not train: the backbone stages before the last
        `trainable_layers`, and with frozen BN every backbone BN scale/bias (buffers in
        torchvision's FrozenBatchNorm2d)."""
        return (backbone_frozen_patterns(self.backbone, self.trainable_layers)
                + frozen_bn_patterns(self.backbone))

    def level_scores(self, outputs: dict):
        raise NotImplementedError

    def decode(self, codes, anchors):
        raise NotImplementedError

    def loss(self, outputs: dict, anchors, level_counts, targets) -> dict:
        raise NotImplementedError

    def __call__(self, images, image_sizes=None, train: bool = False, targets=None):
        if train and targets is None:
            raise ValueError("train=True computes the losses: pass targets ('boxes', 'labels', "
                             "'instance_valid')")
        image_sizes = default_image_sizes(images, image_sizes)
        check_detector_inputs(images, image_sizes)
        pyramid = self.neck(self.backbone(images, train=train))
        levels = [pyramid[n] for n in self.neck.out_levels()]
        outputs = self.head(levels)  # {key: [per level (N, HWA, columns)]}
        if self.is_initializing():  # nothing sown: init returns only the variables
            return empty_detections(images.shape[0], self.detections_per_img)
        anchors = [jnp.asarray(a) for a in
                   self.anchor_generator(images.shape[1:3], [x.shape[1:3] for x in levels])]
        sown = {**pyramid, **{k: jnp.concatenate(v, axis=1) for k, v in outputs.items()},
                "anchors": jnp.concatenate(anchors)}
        for name, value in sown.items():
            self.sow("intermediates", name, value)
        if train:
            concat = {k: jnp.concatenate(v, axis=1).astype(jnp.float32)
                      for k, v in outputs.items()}
            return self.loss(concat, sown["anchors"], [a.shape[0] for a in anchors], targets)
        per_level = [{k: v[i].astype(jnp.float32) for k, v in outputs.items()}
                     for i in range(len(levels))]
        return jax.vmap(self._postprocess, in_axes=(0, None, 0))(per_level, anchors, image_sizes)

    def _postprocess(self, per_level, anchors, image_size):
        """One image: torchvision's postprocess_detections with static shapes."""
        boxes, scores, labels, valid = [], [], [], []
        for outputs, level_anchors in zip(per_level, anchors):
            level = self.level_scores(outputs)  # (HWA, classes)
            classes = level.shape[-1]
            value, index, ok = top_candidates(level.reshape(-1), self.score_thresh,
                                              self.topk_candidates)
            anchor = index // classes
            box = self.decode(outputs["bbox_regression"][anchor], level_anchors[anchor])
            boxes.append(clip_boxes(box[None], image_size[None])[0])
            scores.append(value)
            labels.append(index % classes)
            valid.append(ok)
        cat = jnp.concatenate
        return final_detections(cat(boxes), jnp.where(cat(valid), cat(scores), 0.0), cat(labels),
                                cat(valid), self.nms_thresh, self.detections_per_img)
