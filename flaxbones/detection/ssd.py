"""SSD (torchvision's): a backbone that returns its own list of maps, one 3x3 classification
and one 3x3 box conv per map, default boxes, softmax scores and per-class top-k before a
batched NMS; and torchvision's ssd300_vgg16 (VGG-16 with pool3 in ceil mode, an L2-normalised
conv4_3, dilated conv6, conv7 and four extra stages), fixed 300x300 input."""
import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.vgg import STAGES
from flaxbones.detection.anchors import DefaultBoxGenerator
from flaxbones.detection.base import (
    check_detector_inputs,
    check_num_classes,
    default_image_sizes,
    sequence_frozen_patterns,
    torchvision_detector_source,
)
from flaxbones.detection.boxes import BoxCoder, clip_boxes
from flaxbones.detection.onestage import (
    empty_detections,
    final_detections,
    flatten_level,
    top_candidates,
)
from flaxbones.detection.onestage_losses import check_targets, ssd_loss
from flaxbones.layers import ConvNormAct, ConvNormModule
from flaxbones.registry import register_model

xavier = nn.initializers.xavier_uniform()


class SSDHead(ConvNormModule):
    """torchvision's SSDHead: per input map i a 3x3 `classification_head/conv_i` (num_classes x
    anchors) and `regression_head/conv_i` (4 x anchors), Xavier init; outputs concatenated
    over maps: {'cls_logits': (N, sum HWA, K), 'bbox_regression': (N, sum HWA, 4)}."""

    num_anchors: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, maps, train: bool = False):
        conv = self.conv_def(use_bias=True, kernel_init=xavier)
        pad = ((1, 1), (1, 1))
        out = {"cls_logits": [], "bbox_regression": []}
        for i, (x, a) in enumerate(zip(maps, self.num_anchors)):
            for key, branch, cols in (("cls_logits", "classification_head", self.num_classes),
                                      ("bbox_regression", "regression_head", 4)):
                y = conv(a * cols, (3, 3), padding=pad, name=f"{branch}_conv_{i}")(x)
                out[key].append(flatten_level(y, cols))
        return {k: jnp.concatenate(v, axis=1) for k, v in out.items()}


class SSD(nn.Module):
    """SSD detector: `backbone(images)` -> list of maps -> `head` -> softmax scores; for each
    class but background the top `topk_candidates` above `score_thresh`, boxes decoded with
    BoxCoder((10, 10, 5, 5)) from `anchor_generator`'s default boxes and clipped, then
    per-class NMS. Same call and outputs as the other detectors (K = `detections_per_img`,
    invalid slots zeros); sown intermediates: the maps ('map_0', ...), 'cls_logits',
    'bbox_regression', 'anchors'. `frozen_param_patterns()` is torchvision's
    trainable_backbone_layers (the backbone's `frozen_param_patterns(trainable_layers)`).
    train=True with padded `targets` returns torchvision's {'bbox_regression',
    'classification'}: SSDMatcher(`iou_thresh`), smooth-L1, cross-entropy with hard negatives
    (`neg_to_pos_ratio` per positive)."""

    backbone: nn.Module
    head: nn.Module
    anchor_generator: DefaultBoxGenerator
    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    detections_per_img: int = 200
    topk_candidates: int = 400
    trainable_layers: int | None = None
    iou_thresh: float = 0.5
    neg_to_pos_ratio: float = 3.0

    def frozen_param_patterns(self) -> tuple[str, ...]:
        return self.backbone.frozen_param_patterns(self.trainable_layers)

    def __call__(self, images, image_sizes=None, train: bool = False, targets=None):
        if train and targets is None:
            raise ValueError("train=True computes the losses: pass targets ('boxes', 'labels', "
                             "'instance_valid')")
        image_sizes = default_image_sizes(images, image_sizes)
        check_detector_inputs(images, image_sizes)
        maps = self.backbone(images, train=train)
        outputs = self.head(maps, train=train)
        if self.is_initializing():  # nothing sown, no postprocess (it has no parameters)
            return empty_detections(images.shape[0], self.detections_per_img)
        shapes = [x.shape[1:3] for x in maps]
        anchors = jnp.asarray(self.anchor_generator(images.shape[1:3], shapes))
        sown = {**{f"map_{i}": x for i, x in enumerate(maps)}, **outputs, "anchors": anchors}
        for name, value in sown.items():
            self.sow("intermediates", name, value)
        outputs = {k: v.astype(jnp.float32) for k, v in outputs.items()}
        if train:
            logits = outputs["cls_logits"]
            boxes, labels, valid = check_targets(targets, logits.shape[0], logits.shape[-1])
            return ssd_loss(logits, outputs["bbox_regression"], anchors, boxes, labels, valid,
                            self.iou_thresh, self.neg_to_pos_ratio)
        return jax.vmap(self._postprocess, in_axes=(0, 0, None, 0))(
            outputs["cls_logits"], outputs["bbox_regression"], anchors, image_sizes)

    def _postprocess(self, logits, codes, anchors, image_size):
        """One image: torchvision's SSD.postprocess_detections with static shapes."""
        boxes = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(codes, anchors)
        boxes = clip_boxes(boxes[None], image_size[None])[0]
        scores = jax.nn.softmax(logits, axis=-1)[:, 1:]  # (A, K - 1): background dropped
        pick = jax.vmap(lambda s: top_candidates(s, self.score_thresh, self.topk_candidates),
                        in_axes=1)
        values, index, valid = pick(scores)  # (K - 1, k) each
        labels = jnp.broadcast_to(jnp.arange(1, logits.shape[-1])[:, None], index.shape)
        return final_detections(boxes[index.reshape(-1)], jnp.where(valid, values, 0.0).reshape(-1),
                                labels.reshape(-1), valid.reshape(-1), self.nms_thresh,
                                self.detections_per_img)


class SSDVGG16(ConvNormModule):
    """torchvision's SSDFeatureExtractorVGG (highres=False) on VGG-16: conv1_1 .. conv4_3 as
    flaxbones' VGG names them (pool3 in ceil mode), then `scale_weight` (init 20) times the
    L2-normalised conv4_3 is map 0; pool4, conv5_*, a 3x3/1 pool5, `conv6` (3x3, dilation 6),
    `conv7` (1x1) give map 1 and `conv8_*` .. `conv11_*` maps 2..5 (38 .. 1 px at 300)."""

    EXTRAS = ((256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0))

    def frozen_param_patterns(self, trainable_layers: int | None) -> tuple:
        """`_vgg_extractor`: the VGG stages before the last `trainable_layers` of 5 frozen."""
        units = [f"conv{s + 1}_{j + 1}" for s, w in enumerate(STAGES[16]) for j in range(len(w))]
        return sequence_frozen_patterns(trainable_layers, [0, 2, 4, 7, 10], units)

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = self.conv_def(use_bias=True)
        pool = self.pool_def()
        for s, widths in enumerate(STAGES[16]):
            if s == 4:
                x = pool(x, 2, 2)  # pool4, after the conv4_3 tap
            for j, width in enumerate(widths):
                x = ConvNormAct(width, 3, conv=conv, norm=None, name=f"conv{s + 1}_{j + 1}")(x)
            if s < 3:
                x = pool(x, 2, 2, ceil_mode=s == 2)
            if s == 3:
                norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True))
                scale = self.param("scale_weight", nn.initializers.constant(20.0), (x.shape[-1],),
                                   self.param_dtype)
                maps = [(scale * (x / jnp.maximum(norm, 1e-12))).astype(x.dtype)]
        extra = self.conv_def(use_bias=True, kernel_init=xavier)
        x = pool(x, 3, 1, padding=1)
        x = nn.relu(extra(1024, (3, 3), padding=((6, 6), (6, 6)), kernel_dilation=6,
                          name="conv6")(x))
        maps.append(x := nn.relu(extra(1024, (1, 1), name="conv7")(x)))
        for i, (mid, out, stride, pad) in enumerate(self.EXTRAS, 8):
            x = nn.relu(extra(mid, (1, 1), name=f"conv{i}_1")(x))
            x = nn.relu(extra(out, (3, 3), stride, padding=((pad, pad),) * 2, name=f"conv{i}_2")(x))
            maps.append(x)
        return maps


def _ssd300_rules() -> tuple:
    """torchvision's ssd300_vgg16 keys: `backbone.features.N` (conv1_1 .. conv4_3),
    `backbone.extra.0.{1,3,5}` (conv5_*), `backbone.extra.0.7.{1,3}` (conv6, conv7),
    `backbone.extra.i.{0,2}` (conv{i + 7}_1/2), `head.*_head.module_list.i`."""
    rules, index = [(r"backbone", "backbone")], 0
    for s, widths in enumerate(STAGES[16][:4]):
        for j in range(len(widths)):
            rules.append((rf"backbone\.features\.{index}", f"backbone/conv{s + 1}_{j + 1}/conv"))
            index += 2
        index += 1
    rules += [(rf"backbone\.extra\.0\.{2 * j + 1}", f"backbone/conv5_{j + 1}/conv")
              for j in range(3)]
    rules += [(r"backbone\.extra\.0\.7\.1", "backbone/conv6"),
              (r"backbone\.extra\.0\.7\.3", "backbone/conv7")]
    rules += [(rf"backbone\.extra\.{i}\.{2 * j}", f"backbone/conv{i + 7}_{j + 1}")
              for i in range(1, 5) for j in range(2)]
    rules += [(rf"head\.{b}\.module_list\.(\d)", rf"head/{b}_conv_\1")
              for b in ("classification_head", "regression_head")]
    return tuple(rules)


# torchvision's ssd300 transform: fixed 300x300 resize, no padding, and 0-255 pixel values
# (std 1/255 undoes ToTensor's scaling) less the VGG Caffe mean.
SSD300_SOURCE = torchvision_detector_source(
    _ssd300_rules(), transform=(("fixed_size", (300, 300)), ("size_divisible", 1)),
    mean=(0.48235, 0.45882, 0.40784), std=(1.0 / 255.0,) * 3)


@register_model("detector", SSD300_SOURCE)
def ssd300_vgg16(num_classes: int = 91, score_thresh: float = 0.01, nms_thresh: float = 0.45,
                 detections_per_img: int = 200, topk_candidates: int = 400,
                 trainable_layers: int | None = 4, **kwargs) -> SSD:
    """torchvision's ssd300_vgg16: SSDVGG16 maps, 4/6/6/6/4/4 default boxes (scales 0.07 ..
    1.05, steps 8 .. 300), its postprocess defaults; `kwargs` reach the modules (dtype, ...)."""
    check_num_classes(num_classes)
    anchors = DefaultBoxGenerator(((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
                                  scales=(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
                                  steps=(8, 16, 32, 64, 100, 300))
    head = SSDHead(tuple(anchors.num_anchors_per_location()), num_classes, **kwargs)
    return SSD(SSDVGG16(**kwargs), head, anchors, score_thresh, nms_thresh, detections_per_img,
               topk_candidates, trainable_layers)


__all__ = ["SSD", "SSDVGG16", "SSDHead", "ssd300_vgg16"]
