"""segmentation_models_pytorch's Segformer decoder (smp 0.6): the all-MLP head on any encoder."""
from functools import partial

from flax import linen as nn
import jax.numpy as jnp

from flaxbones.heads.smp.common import Conv2dReLU, SmpHead, SmpSegmentationHead, head_init
from flaxbones.layers import BatchNorm, Conv, ModuleDef, resize_bilinear


class SegformerDecoder(nn.Module):
    """smp's SegformerDecoder on levels given deepest first: a linear projection of each
    (`mlp_stage_i`) to `segmentation_channels`, resized bilinearly (align_corners=False)
    to `size`, concatenated, fused by a 1x1 conv-BN-ReLU (`fuse_stage`)."""

    segmentation_channels: int = 256
    dense: ModuleDef = partial(nn.Dense, kernel_init=head_init)
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, features, size):
        width = self.segmentation_channels
        projected = [resize_bilinear(self.dense(width, name=f"mlp_stage_{i}")(x), size,
                                     align_corners=False) for i, x in enumerate(features)]
        return Conv2dReLU(self.segmentation_channels, 1, conv=self.conv, norm=self.norm,
                          name="fuse_stage")(jnp.concatenate(projected, axis=-1))


class SmpSegformerHead(SmpHead):
    """smp.Segformer's decoder and segmentation head on C1..C`encoder_depth` (C2.. with
    `encoder_has_c1=False`: smp's transformer-style encoders, whose stride-2 feature is
    empty), fused at C2's size (smp: the image's // 4, the same on every input it accepts);
    logits at C2's stride times `upsampling` (4: the input size)."""

    decoder_segmentation_channels: int = 256
    upsampling: int = 4
    encoder_has_c1: bool = True

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=head_init)
        decoder = SegformerDecoder(self.decoder_segmentation_channels, dense=dense,
                                   conv=self.conv_def(), norm=self.norm_def(train), name="decoder")
        x = decoder([features[k] for k in reversed(self.levels)], features["C2"].shape[1:3])
        return self.smp_segmentation_head(1, self.upsampling)(x)


RULES = ((r"decoder\.mlp_stage\.(\d)\.linear", r"head/decoder/mlp_stage_\1"),
         *Conv2dReLU.torch_rules(r"decoder\.fuse_stage", "head/decoder/fuse_stage"),
         *SmpSegmentationHead.torch_rules())
