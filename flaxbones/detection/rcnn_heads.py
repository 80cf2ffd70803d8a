"""The per-RoI heads of Faster / Mask / Keypoint R-CNN, as torchvision builds them.

Every head takes pooled RoI features (N, R, h, w, C) and keeps the leading (N, R). Flatten
before a dense layer is channel-major (the (C, h, w) order of torch's NCHW), so torchvision's
dense weights convert with a plain transpose.
"""
from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers import ConvNormAct, ConvNormModule, resize_bilinear
from flaxbones.layers.conv_transpose import ConvTranspose2d
from flaxbones.layers.init import torch_bias_init, torch_default_init


def _dense(module, features: int, fan_in: int, name: str):
    """torch.nn.Linear's layer and init."""
    return nn.Dense(features, dtype=module.dtype, param_dtype=module.param_dtype,
                    kernel_init=torch_default_init, bias_init=torch_bias_init(fan_in), name=name)


def _flatten_chw(x):
    """(N, R, h, w, C) -> (N, R, C*h*w) in torch's flatten order."""
    return jnp.moveaxis(x, -1, 2).reshape(*x.shape[:2], -1)


def _per_roi(fn, x):
    """Apply a conv stack `fn` to (N, R, h, w, C) as one (N*R, h, w, C) batch."""
    y = fn(x.reshape(-1, *x.shape[2:]))
    return y.reshape(*x.shape[:2], *y.shape[1:])


def _roi_mask(mask):
    """(N, R) RoI validity -> (N*R, 1, 1, 1), BatchNorm's mask for the per-RoI batch."""
    return None if mask is None else mask.reshape(-1, 1, 1, 1)


class TwoMLPHead(ConvNormModule):
    """v1 box head: flatten, `fc6` + ReLU, `fc7` + ReLU (representation_size 1024); `mask`
    is taken for a common signature (no BatchNorm here)."""

    representation_size: int = 1024

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = _flatten_chw(x)
        x = nn.relu(_dense(self, self.representation_size, x.shape[-1], "fc6")(x))
        return nn.relu(_dense(self, self.representation_size, self.representation_size,
                              "fc7")(x))


class ConvFCHead(ConvNormModule):
    """v2 box head (FastRCNNConvFCHead): 3x3 conv-BN-ReLU `conv{i}` per `conv_layers`, flatten,
    dense + ReLU `fc{j}` per `fc_layers` (torchvision's v2: 4 x 256 convs, one 1024 dense).
    `mask` (N, R): the RoIs BatchNorm's train-mode statistics cover (all when None)."""

    conv_layers: Sequence[int] = (256, 256, 256, 256)
    fc_layers: Sequence[int] = (1024,)

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        conv, norm, unit = self.conv_def(), self.norm_def(train), self.block_def(ConvNormAct)
        roi_mask = _roi_mask(mask)

        def convs(y):
            for i, c in enumerate(self.conv_layers):
                y = unit(c, 3, conv=conv, norm=norm, name=f"conv{i}")(y, mask=roi_mask)
            return y

        x = _flatten_chw(_per_roi(convs, x))
        for j, f in enumerate(self.fc_layers):
            x = nn.relu(_dense(self, f, x.shape[-1], f"fc{j}")(x))
        return x


class FastRCNNPredictor(ConvNormModule):
    """`cls_score` (num_classes logits) and `bbox_pred` (4 deltas per class)."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        n = x.shape[-1]
        return (_dense(self, self.num_classes, n, "cls_score")(x),
                _dense(self, 4 * self.num_classes, n, "bbox_pred")(x))


class ConvHead(ConvNormModule):
    """Mask head (MaskRCNNHeads: 4 x 256, BN in v2) or keypoint head (8 x 512, no BN):
    3x3 conv (+BN) + ReLU `conv{i}`; convs have biases exactly when there is no BN.
    `mask` (N, R): the RoIs BatchNorm's train-mode statistics cover (all when None)."""

    layers: Sequence[int] = (256, 256, 256, 256)
    norm: bool = False
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        conv = self.conv_def(use_bias=not self.norm)
        norm = self.norm_def(train) if self.norm else None
        unit = self.block_def(ConvNormAct)
        roi_mask = _roi_mask(mask) if self.norm else None

        def convs(y):
            for i, c in enumerate(self.layers):
                y = unit(c, 3, dilation=self.dilation, conv=conv, norm=norm,
                         name=f"conv{i}")(y, mask=roi_mask)
            return y

        return _per_roi(convs, x)


def _conv_transpose(module, features, kernel, stride, padding, name):
    """torch.nn.ConvTranspose2d(kernel, stride, padding), in the form the module's
    `cpu_kernels` picks; torch's (in, out, kh, kw) weight converts with the conv layout rule."""
    return ConvTranspose2d(features, kernel, stride, padding, cpu=module.cpu_kernels,
                           dtype=module.dtype, param_dtype=module.param_dtype,
                           kernel_init=module.conv_init, name=name)


class MaskRCNNPredictor(ConvNormModule):
    """`conv5_mask` (2x2 stride-2 transposed conv) + ReLU, 1x1 `mask_fcn_logits`:
    (N, K, 14, 14, C) -> per-class mask logits (N, K, 28, 28, num_classes)."""

    num_classes: int
    dim_reduced: int = 256

    @nn.compact
    def __call__(self, x):
        def predict(y):
            y = nn.relu(_conv_transpose(self, self.dim_reduced, 2, 2, 0, "conv5_mask")(y))
            return self.conv_def(use_bias=True)(self.num_classes, (1, 1),
                                                name="mask_fcn_logits")(y)
        return _per_roi(predict, x)


class KeypointRCNNPredictor(ConvNormModule):
    """`kps_score_lowres` (4x4 stride-2 transposed conv, padding 1) then bilinear x2
    (align_corners=False): (N, K, 14, 14, C) -> heatmaps (N, K, 56, 56, num_keypoints)."""

    num_keypoints: int = 17

    @nn.compact
    def __call__(self, x):
        def predict(y):
            y = _conv_transpose(self, self.num_keypoints, 4, 2, 1, "kps_score_lowres")(y)
            return resize_bilinear(y, (2 * y.shape[1], 2 * y.shape[2]))
        return _per_roi(predict, x)


def select_class(maps, labels):
    """maps (N, K, h, w, C), labels (N, K) -> (N, K, h, w): each box's own class channel."""
    return jnp.take_along_axis(maps, labels[:, :, None, None, None], -1)[..., 0]


__all__ = ["ConvFCHead", "ConvHead", "FastRCNNPredictor", "KeypointRCNNPredictor",
           "MaskRCNNPredictor", "TwoMLPHead", "select_class"]
