"""segmentation_models_pytorch's FPN (smp 0.6) as a head: a top-down pyramid of 1x1
laterals, per level 3x3 conv-GroupNorm-ReLU blocks that upsample to the finest level,
summed (or concatenated), spatial dropout, then smp's segmentation head."""
from functools import partial
from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.smp.common import SmpHead, SmpSegmentationHead, decoder_init
from flaxbones.heads.smp.unet import check_divisible, check_interpolation, interpolate
from flaxbones.layers import Conv, ConvNormAct, ModuleDef, resize_bilinear

MERGE_POLICIES = ("add", "cat")


def _twice(x):
    return (2 * x.shape[1], 2 * x.shape[2])


class FPNDecoder(nn.Module):
    """smp's FPNDecoder on its four inputs (finest first, smp's c2..c5): 1x1 conv `p5` on
    the deepest; for p4..p2 the previous level 2x upsampled (`interpolation_mode`) plus a
    1x1 conv of the skip (`p{k}_skip_conv`). Level i (p5 first) gets max(3 - i, 1) blocks
    `seg_blocks_{i}_{j}` (3x3 conv, GroupNorm(32), ReLU, 2x bilinear with align_corners=True
    while upsampling), then `merge_policy` and Dropout2d."""

    pyramid_channels: int = 256
    segmentation_channels: int = 128
    dropout: float = 0.2
    merge_policy: str = "add"
    interpolation_mode: str = "nearest"
    conv: ModuleDef = partial(Conv, use_bias=False, kernel_init=decoder_init)
    group_norm: ModuleDef = partial(nn.GroupNorm, num_groups=32, epsilon=1e-5)
    block: ModuleDef = ConvNormAct

    @nn.compact
    def __call__(self, features: Sequence, train: bool = False):
        c2, c3, c4, c5 = features
        lateral = partial(self.conv, self.pyramid_channels, (1, 1), use_bias=True)
        pyramid = [lateral(name="p5")(c5)]
        for name, skip in (("p4", c4), ("p3", c3), ("p2", c2)):
            up = interpolate(pyramid[-1], _twice(pyramid[-1]), self.interpolation_mode)
            pyramid.append(up + lateral(name=f"{name}_skip_conv")(skip))
        unit = partial(self.block, self.segmentation_channels, 3, conv=self.conv,
                       norm=self.group_norm)
        outs = []
        for i, (x, ups) in enumerate(zip(pyramid, (3, 2, 1, 0))):
            for j in range(max(ups, 1)):
                x = unit(name=f"seg_blocks_{i}_{j}")(x)
                if ups:
                    x = resize_bilinear(x, _twice(x), align_corners=True)
            outs.append(x)
        x = sum(outs[1:], outs[0]) if self.merge_policy == "add" else jnp.concatenate(outs, -1)
        return nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)


class SmpFPNHead(SmpHead):
    """smp.FPN's decoder and segmentation head (1x1 conv, `upsampling` x bilinear) on the
    deepest four levels C`encoder_depth - 3`..C`encoder_depth`; logits at the finest one's
    stride / `upsampling` (the input size for depth 5). Depth 3 reads smp's features[0],
    the image itself, as level `C0`. Inputs must halve exactly level to level, as smp's
    (divisible by 32 at depth 5)."""

    decoder_pyramid_channels: int = 256
    decoder_segmentation_channels: int = 128
    decoder_merge_policy: str = "add"
    decoder_dropout: float = 0.2
    decoder_interpolation: str = "nearest"
    upsampling: int = 4

    @nn.nowrap
    def check_options(self):
        super().check_options()
        if self.decoder_merge_policy not in MERGE_POLICIES:
            raise ValueError(f"decoder_merge_policy must be one of {MERGE_POLICIES}, "
                             f"got {self.decoder_merge_policy!r}")
        check_interpolation(self.decoder_interpolation)
        if self.decoder_segmentation_channels % 32:
            raise ValueError("decoder_segmentation_channels must be a multiple of 32 "
                             f"(GroupNorm(32)), got {self.decoder_segmentation_channels}")

    @property
    def first_level(self):
        return self.encoder_depth - 3

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        gn = partial(nn.GroupNorm, num_groups=32, epsilon=1e-5, use_fast_variance=False,
                     dtype=self.dtype, param_dtype=self.param_dtype)
        feats = [features[n] for n in self.levels]
        check_divisible(self, feats)
        x = FPNDecoder(self.decoder_pyramid_channels, self.decoder_segmentation_channels,
                       self.decoder_dropout, self.decoder_merge_policy,
                       self.decoder_interpolation, conv=self.conv_def(), group_norm=gn,
                       block=self.block_def(ConvNormAct), name="decoder")(
            feats, train=train)
        return self.smp_segmentation_head(1, self.upsampling)(x)


_SEG_BLOCK = r"decoder\.seg_blocks\.(\d)\.block\.(\d)\.block"
RULES = ((r"decoder\.p5", "head/decoder/p5"),
         (r"decoder\.(p[234])\.skip_conv", r"head/decoder/\1_skip_conv"),
         (_SEG_BLOCK + r"\.0", r"head/decoder/seg_blocks_\1_\2/conv"),
         (_SEG_BLOCK + r"\.1", r"head/decoder/seg_blocks_\1_\2/bn"),
         *SmpSegmentationHead.torch_rules())
