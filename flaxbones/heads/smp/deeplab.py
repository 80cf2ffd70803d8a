"""segmentation_models_pytorch's DeepLabV3 and DeepLabV3+ decoders (smp 0.6) as heads.

smp's ASPP is torchvision's (1x1 branch, three atrous branches, image pooling last, 1x1
projection, dropout), reused here from `heads.aspp`; its separable convolutions differ from
TF DeepLab's: one BatchNorm after the pointwise conv, none between the two convs.
"""
from functools import partial
from typing import Callable, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.aspp import ASPP
from flaxbones.heads.smp.common import SmpHead, SmpSegmentationHead
from flaxbones.layers import (BatchNorm, Conv, ConvNormAct, ModuleDef, SeparableConv,
                              resize_bilinear)


class SeparableConvNormAct(nn.Module):
    """smp's SeparableConv2d (depthwise kxk `conv_dw`, pointwise 1x1 `conv_pw`, both
    bias-free, nothing between them), then a BatchNorm (`bn`) and `act`."""

    features: int
    kernel_size: int = 3
    dilation: int = 1
    conv: ModuleDef = partial(Conv, use_bias=False)
    norm: ModuleDef = BatchNorm
    act: Callable | None = nn.relu

    @nn.compact
    def __call__(self, x):
        sep = SeparableConv(self.features, self.kernel_size, dilation=self.dilation,
                            conv=self.conv, norm=None)
        nn.share_scope(self, sep)
        x = self.norm(name="bn")(sep(x))
        return x if self.act is None else self.act(x)


def _aspp(dec, x, train):
    """smp's ASPP of decoder `dec` on `x` (module `aspp`: `convs_0..3`, `pool`, `project`)."""
    return ASPP(dec.atrous_rates, dec.out_channels, dec.aspp_dropout, pool_first=False,
                separable=dec.aspp_separable, conv=dec.conv, norm=dec.norm, block=dec.block,
                separable_block=dec.separable_block, name="aspp")(x, train=train)


class DeepLabV3Decoder(nn.Module):
    """smp's DeepLabV3Decoder: ASPP (`aspp`) on the deepest feature, 3x3 conv (`conv`),
    BatchNorm (`bn`), ReLU. DeepLabV3PlusDecoder shares its options."""

    out_channels: int = 256
    atrous_rates: Sequence[int] = (12, 24, 36)
    aspp_separable: bool = False
    aspp_dropout: float = 0.5
    conv: ModuleDef = partial(Conv, use_bias=False)
    norm: ModuleDef = BatchNorm
    block: ModuleDef = ConvNormAct
    separable_block: ModuleDef = SeparableConvNormAct

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _aspp(self, x, train)
        x = self.conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)
        return nn.relu(self.norm(name="bn")(x))


class DeepLabV3PlusDecoder(DeepLabV3Decoder):
    """smp's DeepLabV3PlusDecoder: ASPP and a separable conv-BN-ReLU (`aspp`, `aspp_conv`)
    on the deepest feature, upsampled bilinearly (align_corners=True) to the stride-4
    feature, which a 1x1 conv-BN-ReLU projects to 48 channels (`block1`); concatenated
    (ASPP first), a separable conv-BN-ReLU (`block2`)."""

    aspp_separable: bool = True
    highres_channels: int = 48

    @nn.compact
    def __call__(self, high, deep, train: bool = False):
        unit = dict(conv=self.conv, norm=self.norm)
        x = _aspp(self, deep, train)
        x = self.separable_block(self.out_channels, 3, **unit, name="aspp_conv")(x)
        # smp scales by a fixed 4 (or 2); the stride-4 level's size is that on every input
        # smp accepts (divisible by the output stride) and defined on every other.
        x = resize_bilinear(x, high.shape[1:3], align_corners=True)
        high = self.block(self.highres_channels, 1, **unit, name="block1")(high)
        x = jnp.concatenate([x, high], axis=-1)
        return self.separable_block(self.out_channels, 3, **unit, name="block2")(x)


class _SmpDeepLab(SmpHead):
    """What both smp DeepLab heads share: options, checks, the decoders' arguments."""

    encoder_output_stride: int = 16
    decoder_channels: int = 256
    decoder_atrous_rates: Sequence[int] = (12, 24, 36)
    decoder_aspp_separable: bool = True
    decoder_aspp_dropout: float = 0.5
    upsampling: int | None = 4

    @nn.nowrap
    def check_options(self):
        super().check_options()
        name = type(self).__name__
        if self.encoder_output_stride not in (8, 16):
            raise ValueError(f"{name} supports encoder_output_stride 8 or 16, "
                             f"got {self.encoder_output_stride}")
        rates = tuple(self.decoder_atrous_rates)
        if len(rates) != 3:
            raise ValueError(f"{name} needs 3 decoder_atrous_rates, got {rates}")
        object.__setattr__(self, "decoder_atrous_rates", rates)  # hashable, as smp's lists aren't

    @property
    def supported_strides(self):
        """The stride of the deepest level smp's encoder gives: dilated past the output
        stride, never for depths up to 3."""
        return (min(2 ** self.encoder_depth, self.encoder_output_stride),)

    @nn.nowrap
    def decoder_kwargs(self, train: bool) -> dict:
        return dict(out_channels=self.decoder_channels,
                    atrous_rates=self.decoder_atrous_rates,
                    aspp_separable=self.decoder_aspp_separable,
                    aspp_dropout=self.decoder_aspp_dropout, conv=self.conv_def(),
                    norm=self.norm_def(train), block=self.block_def(ConvNormAct),
                    separable_block=self.block_def(SeparableConvNormAct))


class SmpDeepLabV3Head(_SmpDeepLab):
    """smp.DeepLabV3's decoder and segmentation head on C`encoder_depth`; `upsampling`
    None scales logits back to the input (the output stride, 2**depth for depth <= 3)."""

    encoder_output_stride: int = 8
    decoder_aspp_separable: bool = False
    upsampling: int | None = None

    min_depth = 1

    @property
    def first_level(self):
        return self.encoder_depth

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = DeepLabV3Decoder(**self.decoder_kwargs(train), name="decoder")(
            features[self.levels[-1]], train=train)
        scale = self.upsampling
        if scale is None:
            depth = self.encoder_depth
            scale = 2 ** depth if depth <= 3 else self.encoder_output_stride
        return self.smp_segmentation_head(1, scale)(x)


class SmpDeepLabV3PlusHead(_SmpDeepLab):
    """smp.DeepLabV3Plus's decoder and segmentation head on C2 and C`encoder_depth`;
    logits at C2's stride times `upsampling` (4: the input size)."""

    @property
    def levels(self):
        return ("C2", f"C{self.encoder_depth}")

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        high, deep = (features[name] for name in self.levels)
        x = DeepLabV3PlusDecoder(**self.decoder_kwargs(train), name="decoder")(
            high, deep, train=train)
        return self.smp_segmentation_head(1, self.upsampling)(x)


def _aspp_rules(src: str, dst: str) -> tuple:
    """smp's ASPP keys under torch path `src` onto the flax ASPP at `dst`."""
    return ((src + r"convs\.0\.0", dst + "/convs_0/conv"),
            (src + r"convs\.0\.1", dst + "/convs_0/bn"),
            (src + r"convs\.([1-3])\.0", dst + r"/convs_\1/conv"),
            (src + r"convs\.([1-3])\.0\.0", dst + r"/convs_\1/conv_dw"),
            (src + r"convs\.([1-3])\.0\.1", dst + r"/convs_\1/conv_pw"),
            (src + r"convs\.([1-3])\.1", dst + r"/convs_\1/bn"),
            (src + r"convs\.4\.1", dst + "/pool/conv"),
            (src + r"convs\.4\.2", dst + "/pool/bn"),
            (src + r"project\.0", dst + "/project/conv"),
            (src + r"project\.1", dst + "/project/bn"))


_HEAD_RULES = SmpSegmentationHead.torch_rules()

# smp.DeepLabV3's keys, with the `decoder.0/1/2` names of files saved before smp 0.4,
# which smp itself still loads.
V3_RULES = (*_aspp_rules(r"decoder\.(?:aspp|0)\.", "head/decoder/aspp"),
            (r"decoder\.(?:conv|1)", "head/decoder/conv"),
            (r"decoder\.(?:bn|2)", "head/decoder/bn"), *_HEAD_RULES)

V3PLUS_RULES = (*_aspp_rules(r"decoder\.aspp\.0\.", "head/decoder/aspp"),
                (r"decoder\.aspp\.1\.0", "head/decoder/aspp_conv/conv_dw"),
                (r"decoder\.aspp\.1\.1", "head/decoder/aspp_conv/conv_pw"),
                (r"decoder\.aspp\.2", "head/decoder/aspp_conv/bn"),
                (r"decoder\.block1\.0", "head/decoder/block1/conv"),
                (r"decoder\.block1\.1", "head/decoder/block1/bn"),
                (r"decoder\.block2\.0\.0", "head/decoder/block2/conv_dw"),
                (r"decoder\.block2\.0\.1", "head/decoder/block2/conv_pw"),
                (r"decoder\.block2\.1", "head/decoder/block2/bn"), *_HEAD_RULES)

RULES = {"DeepLabV3": V3_RULES, "DeepLabV3Plus": V3PLUS_RULES}
