"""segmentation_models_pytorch's PAN (smp 0.6, Li et al.'s Pyramid Attention Network) as a
head: a Feature Pyramid Attention block on the deepest feature, then Global Attention
Upsample blocks down to stride 4, then smp's segmentation head."""
from functools import partial
from typing import Any

from flax import linen as nn

from flaxbones.heads.smp.common import SmpHead, SmpSegmentationHead, decoder_init
from flaxbones.heads.smp.unet import check_interpolation, interpolate
from flaxbones.layers import (BatchNorm, Conv, ConvNormAct, ModuleDef, global_avg_pool, max_pool,
                              resize_bilinear)


def _interpolate(x, size, mode: str):
    """smp's GAU resize: align_corners=True for 'bilinear' (only), as smp sets it."""
    if mode == "bilinear":
        return resize_bilinear(x, size, align_corners=True)
    return interpolate(x, size, mode)


def _pooled(x):
    return global_avg_pool(x)[:, None, None, :]


class FPABlock(nn.Module):
    """smp's FPABlock (its ConvBnRelu = conv with bias, BN, ReLU): global-pool branch
    `branch1_1` and 1x1 `mid_0` to `features`; a 1-channel U of 2x max pools with 7/5/3x3
    convs (`down1_1`, `down2_1`, `down3_1`, `down3_2`, `conv2`, `conv1`) upsampled back to
    the input (bilinear, align_corners=True; sizes h // 4, h // 2, h); mid * U + branch."""

    features: int
    conv: ModuleDef = partial(Conv, use_bias=True, kernel_init=decoder_init)
    norm: ModuleDef = BatchNorm
    block: ModuleDef = ConvNormAct
    pool: Any = max_pool

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        if min(h, w) < 8:
            raise ValueError(f"smp's PAN needs its deepest level at least 8 x 8 for the FPA's "
                             f"three 2x max pools, got {h} x {w}: use larger images")
        unit = partial(self.block, conv=self.conv, norm=self.norm)
        up = partial(resize_bilinear, align_corners=True)
        branch = up(unit(self.features, 1, name="branch1_1")(_pooled(x)), (h, w))
        mid = unit(self.features, 1, name="mid_0")(x)
        x1 = unit(1, 7, name="down1_1")(self.pool(x, 2, 2))
        x2 = unit(1, 5, name="down2_1")(self.pool(x1, 2, 2))
        x3 = unit(1, 3, name="down3_2")(unit(1, 3, name="down3_1")(self.pool(x2, 2, 2)))
        y = unit(1, 5, name="conv2")(x2) + up(x3, (h // 4, w // 4))
        y = unit(1, 7, name="conv1")(x1) + up(y, (h // 2, w // 2))
        return up(y, (h, w)) * mid + branch


class GAUBlock(nn.Module):
    """smp's GAUBlock: the high-level `y` upsampled to the low-level `x`'s size
    (`interpolation_mode`), plus the 3x3 conv-BN-ReLU `conv2` of `x` gated by the sigmoid of
    a 1x1 conv-BN `conv1_1` of `y`'s global average."""

    features: int
    interpolation_mode: str = "bilinear"
    conv: ModuleDef = partial(Conv, use_bias=True, kernel_init=decoder_init)
    norm: ModuleDef = BatchNorm
    block: ModuleDef = ConvNormAct

    @nn.compact
    def __call__(self, x, y):
        unit = partial(self.block, self.features, conv=self.conv, norm=self.norm)
        gate = nn.sigmoid(unit(1, act=None, name="conv1_1")(_pooled(y)))
        up = _interpolate(y, x.shape[1:3], self.interpolation_mode)
        return up + unit(3, name="conv2")(x) * gate


class PANDecoder(nn.Module):
    """smp's PANDecoder on its inputs (finest first, stride 4 up): `fpa` on the deepest,
    then GAU blocks `gau3` (depth 5), `gau2` (depth >= 4), `gau1` with the shallower
    levels, deepest first."""

    decoder_channels: int = 32
    interpolation_mode: str = "bilinear"
    conv: ModuleDef = partial(Conv, use_bias=True, kernel_init=decoder_init)
    norm: ModuleDef = BatchNorm
    block: ModuleDef = ConvNormAct
    pool: Any = max_pool

    @nn.compact
    def __call__(self, features):
        units = dict(conv=self.conv, norm=self.norm, block=self.block)
        x = FPABlock(self.decoder_channels, **units, pool=self.pool, name="fpa")(features[-1])
        for k in reversed(range(1, len(features))):
            x = GAUBlock(self.decoder_channels, self.interpolation_mode, **units,
                         name=f"gau{k}")(features[k - 1], x)
        return x


class SmpPANHead(SmpHead):
    """smp.PAN's decoder and segmentation head (3x3 conv, `upsampling` x bilinear) on
    C2..C`encoder_depth`; logits at C2's stride / `upsampling` (the input size). smp's PAN
    dilates its encoder to `encoder_output_stride` 16 (or 32); the FPA's three 2x pools need
    the deepest level at least 8 x 8 (inputs of 128 x 128 and up at stride 16)."""

    encoder_output_stride: int = 16
    decoder_channels: int = 32
    decoder_interpolation: str = "bilinear"
    upsampling: int = 4

    first_level = 2

    @nn.nowrap
    def check_options(self):
        super().check_options()
        if self.encoder_output_stride not in (16, 32):
            raise ValueError("smp's PAN supports encoder_output_stride 16 or 32, "
                             f"got {self.encoder_output_stride}")
        check_interpolation(self.decoder_interpolation)

    @property
    def supported_strides(self):
        """The deepest level's stride in smp's encoder: dilated past the output stride."""
        return (min(2 ** self.encoder_depth, self.encoder_output_stride),)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = PANDecoder(self.decoder_channels, self.decoder_interpolation,
                       conv=self.conv_def(use_bias=True), norm=self.norm_def(train),
                       block=self.block_def(ConvNormAct), pool=self.pool_def(), name="decoder")(
            [features[n] for n in self.levels])
        return self.smp_segmentation_head(3, self.upsampling)(x)


RULES = ((r"decoder\.fpa\.(branch1|down1|down2)\.1\.(conv|bn)", r"head/decoder/fpa/\1_1/\2"),
         (r"decoder\.fpa\.mid\.0\.(conv|bn)", r"head/decoder/fpa/mid_0/\1"),
         (r"decoder\.fpa\.down3\.([12])\.(conv|bn)", r"head/decoder/fpa/down3_\1/\2"),
         (r"decoder\.fpa\.(conv[12])\.(conv|bn)", r"head/decoder/fpa/\1/\2"),
         (r"decoder\.(gau[123])\.conv1\.1\.(conv|bn)", r"head/decoder/\1/conv1_1/\2"),
         (r"decoder\.(gau[123])\.conv2\.(conv|bn)", r"head/decoder/\1/conv2/\2"),
         *SmpSegmentationHead.torch_rules())
