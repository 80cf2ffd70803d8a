"""segmentation_models_pytorch's U-Net decoder (smp 0.6) as a head, the base of its family
(`SmpUnetFamilyHead`: U-Net, U-Net++, Linknet, MAnet) and smp's decoder interpolation modes
(`interpolate`).

smp 0.6's U-Net resizes to the sizes of the encoder's features, not by a fixed 2: each block
upsamples to its skip's size and the last one to the image's (smp's features[0]), so it
takes any input size; its heads' logits are at the input size.
"""
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.heads.smp.common import (Attention, Conv2dReLU, SmpHead, SmpSegmentationHead,
                                        norm_type)
from flaxbones.layers import BatchNorm, Conv, ModuleDef, adaptive_avg_pool, resize_bilinear

MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def _nearest_index(size_in: int, size_out: int, exact: bool) -> np.ndarray:
    """torch's CPU source indices for 'nearest' / 'nearest-exact' (float32 scale in/out)."""
    dst = np.arange(size_out)
    if size_out == 2 * size_in and not exact:
        return dst // 2
    scale = np.float32(size_in) / np.float32(size_out)
    src = (dst + 0.5) * np.float64(scale) if exact else dst.astype(np.float32) * scale
    return np.minimum(np.floor(src.astype(np.float32)).astype(np.int64), size_in - 1)


def _cubic_taps(size_in: int, size_out: int):
    """Per output index: torch's 4 bicubic source indices (clamped) and weights (A = -0.75,
    align_corners=False)."""
    a = -0.75
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    i0 = np.minimum(np.floor(src), size_in - 1).astype(np.int64)
    t = np.clip(src - i0, 0.0, 1.0)
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # noqa: E731
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # noqa: E731
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)
    index = np.clip(i0[:, None] + np.arange(-1, 3), 0, size_in - 1)
    return index, weights.astype(np.float32)


def _resize_axis(x, axis: int, size_out: int, mode: str):
    size_in = x.shape[axis]
    if size_in == size_out and mode != "bicubic":
        return x
    if mode != "bicubic":
        return jnp.take(x, _nearest_index(size_in, size_out, mode == "nearest-exact"), axis=axis)
    index, weights = _cubic_taps(size_in, size_out)
    taps = jnp.take(x, index.reshape(-1), axis=axis)
    taps = taps.reshape(x.shape[:axis] + (size_out, 4) + x.shape[axis + 1:])
    shape = (size_out, 4) + (1,) * (x.ndim - axis - 1)
    return jnp.sum(taps * jnp.asarray(weights.reshape(shape), x.dtype), axis=axis + 1)


def interpolate(x, size, mode: str = "nearest"):
    """torch's `F.interpolate(x, size, mode=mode)` on NHWC `x` for smp's decoder modes:
    'nearest', 'nearest-exact', 'bilinear' and 'bicubic' (align_corners=False), 'area'."""
    check_interpolation(mode)
    size = tuple(int(s) for s in size)
    if mode == "bilinear":
        return resize_bilinear(x, size, align_corners=False)
    if mode == "area":
        return x if tuple(x.shape[1:3]) == size else adaptive_avg_pool(x, size)
    return _resize_axis(_resize_axis(x, 1, size[0], mode), 2, size[1], mode)


def check_interpolation(mode: str):
    """A ValueError for an interpolation mode `interpolate` does not have."""
    if mode not in MODES:
        raise ValueError(f"decoder_interpolation {mode!r} is not supported; choose one of {MODES}")


class UnetDecoderBlock(nn.Module):
    """smp's UnetDecoderBlock: resize to `size`, concatenate the skip (if any) and attend
    (`attention1`; held but unused without a skip, as smp's), two 3x3 Conv2dReLU (`conv1`,
    `conv2`), attend (`attention2`)."""

    features: int
    use_norm: Any = "batchnorm"
    attention_type: str | None = None
    interpolation: str = "nearest"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x, size, skip=None):
        unit = dict(padding=1, use_norm=self.use_norm, conv=self.conv, norm=self.norm)
        x = interpolate(x, size, self.interpolation)
        attention1 = Attention(self.attention_type, conv=self.conv, name="attention1")
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
            x = attention1(x)
        elif self.is_initializing():
            attention1(x)  # smp builds it without a skip too (its parameters count), unused
        x = Conv2dReLU(self.features, 3, **unit, name="conv1")(x)
        x = Conv2dReLU(self.features, 3, **unit, name="conv2")(x)
        return Attention(self.attention_type, conv=self.conv, name="attention2")(x)

    @staticmethod
    def torch_rules(src: str, dst: str) -> tuple:
        return (*Conv2dReLU.torch_rules(src + r"\.conv1", dst + "/conv1"),
                *Conv2dReLU.torch_rules(src + r"\.conv2", dst + "/conv2"),
                *Attention.torch_rules(src + r"\.attention1", dst + "/attention1"),
                *Attention.torch_rules(src + r"\.attention2", dst + "/attention2"))


def center_block(x, use_norm, conv, norm):
    """smp's center block (VGG encoders): two 3x3 Conv2dReLU keeping the width (`center_0/1`)."""
    unit = dict(padding=1, use_norm=use_norm, conv=conv, norm=norm)
    x = Conv2dReLU(x.shape[-1], 3, **unit, name="center_0")(x)
    return Conv2dReLU(x.shape[-1], 3, **unit, name="center_1")(x)


class UnetDecoder(nn.Module):
    """smp's UnetDecoder on `features` [C1, ..., Cn] (finest first) and the image `size`:
    an optional center block on Cn, then block i (`blocks_i`) resizes to the next finer
    level's size and fuses it; the last block resizes to `size`, without a skip."""

    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    use_norm: Any = "batchnorm"
    attention_type: str | None = None
    center: bool = False
    interpolation: str = "nearest"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    block: ModuleDef = UnetDecoderBlock

    @nn.compact
    def __call__(self, features: Sequence, size):
        sizes = [tuple(size)] + [f.shape[1:3] for f in features]
        x, skips = features[-1], features[::-1][1:]
        if self.center:
            x = center_block(x, self.use_norm, self.conv, self.norm)
        for i, width in enumerate(self.decoder_channels):
            skip = skips[i] if i < len(skips) else None
            x = self.block(width, self.use_norm, self.attention_type, self.interpolation,
                           self.conv, self.norm, name=f"blocks_{i}")(x, sizes[-2 - i], skip)
        return x


class SmpUnetFamilyHead(SmpHead):
    """What smp's U-Net, U-Net++, Linknet and MAnet heads share: the decoder norm, levels
    C1..C`encoder_depth` (from C2 without a subclass's `encoder_has_c1`), their checks."""

    decoder_use_norm: Any = "batchnorm"

    align_corners = False  # no final upsampling in smp: SegmentationHead's rule

    @property
    def min_depth(self) -> int:
        """One level at least: C1 (C2 without `encoder_has_c1`)."""
        return self.first_level

    @nn.nowrap
    def check_options(self):
        """Also one decoder width per stage, norm, interpolation and attention (those it has)."""
        super().check_options()
        depth, channels = self.encoder_depth, tuple(getattr(self, "decoder_channels", ()))
        if hasattr(self, "decoder_channels") and len(channels) != depth:
            raise ValueError(f"Model depth is {depth}, but you provide `decoder_channels` for "
                             f"{len(channels)} blocks: {channels}")
        norm_type(self.decoder_use_norm)
        check_interpolation(getattr(self, "decoder_interpolation", "nearest"))
        attention = getattr(self, "decoder_attention_type", None)
        if attention not in (None, "scse"):
            raise ValueError(f"decoder_attention_type {attention!r} is not implemented; "
                             "choose None or 'scse'")

    @nn.nowrap
    def decoder_features(self, features: dict, size=None) -> list:
        """smp's features[1:] (C1 first) from the feature dict: without `encoder_has_c1`, C1
        is an empty (0-channel) map at the image's size // 2, as smp's transformer-style
        encoders give (`size` None: an image of four times C2's size)."""
        feats = [features[name] for name in self.levels]
        if not getattr(self, "encoder_has_c1", True):
            first = feats[0]
            h, w = ((size[0] // 2, size[1] // 2) if size is not None
                    else (2 * first.shape[1], 2 * first.shape[2]))
            feats.insert(0, jnp.zeros((first.shape[0], h, w, 0), first.dtype))
        return feats


class UnetOptionsHead(SmpUnetFamilyHead):
    """The decoder options smp's U-Net and U-Net++ share; `unet_decoder` builds either."""

    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    decoder_attention_type: str | None = None
    decoder_interpolation: str = "nearest"
    center: bool = False

    @nn.nowrap
    def unet_decoder(self, cls, train: bool):
        """`cls` (UnetDecoder or UnetPlusPlusDecoder) on this head's options, as `decoder`."""
        return cls(self.decoder_channels, self.decoder_use_norm, self.decoder_attention_type,
                   self.center, self.decoder_interpolation, self.conv_def(),
                   self.norm_def(train), self.block_def(UnetDecoderBlock), name="decoder")


class SmpUnetHead(UnetOptionsHead):
    """smp.Unet's decoder (`decoder`) and segmentation head (3x3 conv, `segmentation_head`)
    on C1..C`encoder_depth`; logits at the image size `size` (smp's features[0]; None:
    twice C1's, the image's when its sides are even). `center` is smp's choice for VGG
    encoders; `encoder_has_c1=False` for encoders without a stride-2 level (smp's
    transformer-style ones: an empty skip)."""

    encoder_has_c1: bool = True

    @nn.compact
    def __call__(self, features: dict, train: bool = False, size=None):
        feats = self.decoder_features(features, size)
        size = size if size is not None else tuple(2 * s for s in feats[0].shape[1:3])
        x = self.unet_decoder(UnetDecoder, train)(feats, size)
        return self.smp_segmentation_head(3)(x)


def check_divisible(head, feats, size=None):
    """smp's input check for the decoders that upsample by a fixed 2 (image sides divisible
    by 2**depth): each level of `feats` (finest first) half the size of the one above, the
    image `size` (if given) twice C1's."""
    sizes = ([tuple(size)] if size is not None else []) + [tuple(f.shape[1:3]) for f in feats]
    if any(a != (2 * b, 2 * c) for a, (b, c) in zip(sizes, sizes[1:])):
        raise ValueError(f"{type(head).__name__} needs image sides divisible by "
                         f"{2 ** head.encoder_depth} (2**encoder_depth), as smp does: pad the "
                         f"images (sizes image, C1, ...: {sizes})")


def center_rules(src: str = r"decoder\.center", dst: str = "head/decoder") -> tuple:
    return (*Conv2dReLU.torch_rules(src + r"\.0", dst + "/center_0"),
            *Conv2dReLU.torch_rules(src + r"\.1", dst + "/center_1"))


RULES = (*UnetDecoderBlock.torch_rules(r"decoder\.blocks\.(\d+)", r"head/decoder/blocks_\1"),
         *center_rules(), *SmpSegmentationHead.torch_rules())
