"""segmentation_models_pytorch's UPerNet (smp 0.6) as a head: LayerNorm on every input level,
a pyramid-pooling module on the deepest, an FPN of 1x1 laterals and 3x3 convs over the
others, all upsampled (bilinear, half-pixel) to stride 4, concatenated and fused by a 3x3
conv; then smp's segmentation head."""
from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.smp.common import Conv2dReLU, SmpHead, SmpSegmentationHead, norm_type
from flaxbones.layers import BatchNorm, Conv, ModuleDef, adaptive_avg_pool, resize_bilinear


class UPerNetDecoder(nn.Module):
    """smp's UPerNetDecoder on its inputs (finest first, stride 4 up): `feature_norms_{i}`
    (LayerNorm over channels, eps 1e-6); on the deepest, `psp_blocks_{i}` (adaptive
    average pool to 1/2/3/6 bins, 1x1 Conv2dReLU) upsampled back, concatenated after the
    feature, 3x3 Conv2dReLU `psp_out_conv` (always batch-normed, as smp); top-down, each
    shallower level's 1x1 Conv2dReLU `fpn_lateral_blocks_{k}` plus the previous output
    upsampled to it, then a 3x3 Conv2dReLU `fpn_conv_blocks_{k}`; every output upsampled to
    the finest, concatenated finest first, 3x3 Conv2dReLU `fusion_block`."""

    decoder_channels: int = 256
    use_norm: Any = "batchnorm"
    sizes: Sequence[int] = (1, 2, 3, 6)
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    layer_norm: ModuleDef = partial(nn.LayerNorm, epsilon=1e-6)
    block: ModuleDef = Conv2dReLU

    @nn.compact
    def __call__(self, features: Sequence):
        feats = [self.layer_norm(name=f"feature_norms_{i}")(f) for i, f in enumerate(features)]
        unit = partial(self.block, self.decoder_channels, conv=self.conv, norm=self.norm)
        deep = feats[-1]
        pyramid = [deep]
        for i, bins in enumerate(self.sizes):
            y = adaptive_avg_pool(deep, bins)
            y = unit(1, use_norm=self.use_norm, name=f"psp_blocks_{i}")(y)
            pyramid.append(resize_bilinear(y, deep.shape[1:3]))
        outs = [unit(3, padding=1, name="psp_out_conv")(jnp.concatenate(pyramid, axis=-1))]
        for k, lateral in enumerate(reversed(feats[:-1])):
            lateral = unit(1, use_norm=self.use_norm, name=f"fpn_lateral_blocks_{k}")(lateral)
            outs.append(resize_bilinear(outs[-1], lateral.shape[1:3]) + lateral)
        outs[1:] = [unit(3, padding=1, use_norm=self.use_norm, name=f"fpn_conv_blocks_{k}")(x)
                    for k, x in enumerate(outs[1:])]
        size = outs[-1].shape[1:3]
        x = jnp.concatenate([resize_bilinear(x, size) for x in reversed(outs)], axis=-1)
        return unit(3, padding=1, use_norm=self.use_norm, name="fusion_block")(x)


class SmpUPerNetHead(SmpHead):
    """smp.UPerNet's decoder and segmentation head (1x1 conv, `upsampling` x bilinear) on
    C2..C`encoder_depth`; logits at C2's stride / `upsampling` (the input size)."""

    decoder_channels: int = 256
    decoder_use_norm: Any = "batchnorm"
    upsampling: int = 4

    first_level = 2

    @nn.nowrap
    def check_options(self):
        super().check_options()
        norm_type(self.decoder_use_norm)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        ln = partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        x = UPerNetDecoder(self.decoder_channels, self.decoder_use_norm, conv=self.conv_def(),
                           norm=self.norm_def(train), layer_norm=ln,
                           block=self.block_def(Conv2dReLU), name="decoder")(
            [features[n] for n in self.levels])
        return self.smp_segmentation_head(1, self.upsampling)(x)


RULES = ((r"decoder\.feature_norms\.(\d)", r"head/decoder/feature_norms_\1"),
         *Conv2dReLU.torch_rules(r"decoder\.psp\.blocks\.(\d)\.1", r"head/decoder/psp_blocks_\1"),
         *Conv2dReLU.torch_rules(r"decoder\.psp\.out_conv", "head/decoder/psp_out_conv"),
         *Conv2dReLU.torch_rules(r"decoder\.fpn_lateral_blocks\.(\d)\.conv_norm_relu",
                                 r"head/decoder/fpn_lateral_blocks_\1"),
         *Conv2dReLU.torch_rules(r"decoder\.fpn_conv_blocks\.(\d)",
                                 r"head/decoder/fpn_conv_blocks_\1"),
         *Conv2dReLU.torch_rules(r"decoder\.fusion_block", "head/decoder/fusion_block"),
         *SmpSegmentationHead.torch_rules())
