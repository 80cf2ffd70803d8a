"""Anchors and SSD default boxes as torchvision makes them, in numpy float32: every shape
involved is static, so they are computed once at trace time and enter the jitted graph as
constants."""
import dataclasses
import math

import numpy as np

_F32 = np.float32


def _per_level(value, n):
    if isinstance(value[0], (list, tuple)):
        return tuple(tuple(v) for v in value)
    return (tuple(value),) * n


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
    """torchvision's AnchorGenerator: per level, len(sizes) x len(ratios) base anchors (ratio =
    h / w) rounded to integers and centred on 0, shifted by stride = padded image size // feature
    size (no half-cell offset); order is location-major (y, then x), then ratio, then size."""

    sizes: tuple = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple = ((0.5, 1.0, 2.0),) * 5

    def __post_init__(self):
        sizes = self.sizes
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        object.__setattr__(self, "sizes", tuple(tuple(s) for s in sizes))
        object.__setattr__(self, "aspect_ratios", _per_level(self.aspect_ratios, len(sizes)))
        if len(self.aspect_ratios) != len(self.sizes):
            raise ValueError(f"{len(self.sizes)} levels of sizes but {len(self.aspect_ratios)} of "
                             "aspect_ratios; give one tuple of each per feature level")

    def num_anchors_per_location(self):
        """Anchors at each feature position of every level."""
        return tuple(len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios))

    def cell_anchors(self):
        """Per level the (A, 4) zero-centred base anchors, torchvision's float32 math + round."""
        out = []
        for sizes, ratios in zip(self.sizes, self.aspect_ratios):
            scales, ratios = np.asarray(sizes, _F32), np.asarray(ratios, _F32)
            h_ratios = np.sqrt(ratios)
            w_ratios = _F32(1) / h_ratios
            ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
            hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
            out.append(np.round(np.stack([-ws, -hs, ws, hs], axis=1) / _F32(2)))
        return out

    def __call__(self, image_shape, feature_shapes):
        """Anchors per level, each (h * w * A, 4) float32 xyxy, for a padded batch of `image_shape`
        (H, W) and feature maps of `feature_shapes` [(h, w), ...]."""
        feature_shapes = [tuple(int(v) for v in s) for s in feature_shapes]
        if len(feature_shapes) != len(self.sizes):
            raise ValueError(f"{len(feature_shapes)} feature maps for an AnchorGenerator with "
                             f"{len(self.sizes)} levels of sizes/aspect ratios")
        H, W = (int(v) for v in image_shape)
        out = []
        for (h, w), base in zip(feature_shapes, self.cell_anchors()):
            sx = np.arange(w, dtype=np.int64) * (W // w)
            sy = np.arange(h, dtype=np.int64) * (H // h)
            yy, xx = np.meshgrid(sy, sx, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = np.stack([xx, yy, xx, yy], axis=1).astype(_F32)
            out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
        return out


def retinanet_anchor_generator():
    """RetinaNet's: sizes x * 2^(0, 1/3, 2/3) (int-truncated) for x in 32..512, ratios 0.5/1/2."""
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
                  for x in (32, 64, 128, 256, 512))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def fcos_anchor_generator():
    """FCOS's: one square anchor per location, sizes 8..128 (its anchor centres are the points)."""
    return AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)


@dataclasses.dataclass(frozen=True)
class DefaultBoxGenerator:
    """torchvision's SSD DefaultBoxGenerator: per level 2 + 2 * len(ratios) boxes (scale s_k,
    sqrt(s_k s_k+1), then (w, h) and (h, w) per ratio) at cell centres, returned in pixels xyxy."""

    aspect_ratios: tuple
    min_ratio: float = 0.15
    max_ratio: float = 0.9
    scales: tuple = None
    steps: tuple = None
    clip: bool = True

    def __post_init__(self):
        ratios = tuple(tuple(r) for r in self.aspect_ratios)
        object.__setattr__(self, "aspect_ratios", ratios)
        n = len(ratios)
        if self.steps is not None:
            if len(self.steps) != n:
                raise ValueError("aspect_ratios and steps should have the same length")
            object.__setattr__(self, "steps", tuple(self.steps))
        if self.scales is None:
            if n > 1:
                rng = self.max_ratio - self.min_ratio
                scales = [self.min_ratio + rng * k / (n - 1.0) for k in range(n)] + [1.0]
            else:
                scales = [self.min_ratio, self.max_ratio]
            object.__setattr__(self, "scales", tuple(scales))
        else:
            object.__setattr__(self, "scales", tuple(self.scales))

    def num_anchors_per_location(self):
        """Default boxes at each feature position of every level."""
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

    def wh_pairs(self):
        """Per level the (A, 2) relative (w, h) pairs, float32 as torchvision's _wh_pairs."""
        out = []
        for k, ratios in enumerate(self.aspect_ratios):
            s_k = self.scales[k]
            s_prime = math.sqrt(self.scales[k] * self.scales[k + 1])
            pairs = [[s_k, s_k], [s_prime, s_prime]]
            for ar in ratios:
                w, h = s_k * math.sqrt(ar), s_k / math.sqrt(ar)
                pairs += [[w, h], [h, w]]
            out.append(np.asarray(pairs, _F32))
        return out

    def __call__(self, image_shape, feature_shapes):
        """All default boxes (sum h * w * A, 4) float32 xyxy pixels for a padded batch of
        `image_shape` (H, W) and feature maps of `feature_shapes` [(h, w), ...]."""
        H, W = (int(v) for v in image_shape)
        if len(feature_shapes) != len(self.aspect_ratios):
            raise ValueError(f"{len(feature_shapes)} feature maps for a DefaultBoxGenerator with "
                             f"{len(self.aspect_ratios)} levels of aspect ratios")
        boxes = []
        for k, ((fh, fw), pairs) in enumerate(zip(feature_shapes, self.wh_pairs())):
            fh, fw = int(fh), int(fw)
            if self.steps is not None:
                x_f, y_f = _F32(W / self.steps[k]), _F32(H / self.steps[k])
            else:
                x_f, y_f = _F32(fw), _F32(fh)
            sx = (np.arange(fw).astype(_F32) + _F32(0.5)) / x_f
            sy = (np.arange(fh).astype(_F32) + _F32(0.5)) / y_f
            yy, xx = np.meshgrid(sy, sx, indexing="ij")
            centres = np.stack([xx.reshape(-1), yy.reshape(-1)], axis=1)
            centres = np.repeat(centres, len(pairs), axis=0)
            wh = np.clip(pairs, 0, 1) if self.clip else pairs
            wh = np.tile(wh, (fh * fw, 1))
            boxes.append(np.concatenate([centres, wh], axis=1))
        boxes = np.concatenate(boxes, axis=0)
        size = np.asarray([W, H], _F32)
        half = _F32(0.5) * boxes[:, 2:]
        return np.concatenate([(boxes[:, :2] - half) * size, (boxes[:, :2] + half) * size], axis=1)


def ssd300_box_generator():
    """SSD300-VGG16's default boxes (torchvision's ssd300_vgg16 arguments)."""
    return DefaultBoxGenerator(((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
                               scales=(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
                               steps=(8, 16, 32, 64, 100, 300))


def ssdlite320_box_generator():
    """SSDlite320-MobileNetV3's default boxes (torchvision's ssdlite320_mobilenet_v3_large)."""
    return DefaultBoxGenerator(((2, 3),) * 6, min_ratio=0.2, max_ratio=0.95)
