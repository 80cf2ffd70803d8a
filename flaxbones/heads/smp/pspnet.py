"""segmentation_models_pytorch's PSPNet (smp 0.6) as a head: pyramid pooling of the deepest
feature (1/2/3/6 bins, torch's adaptive-pool bin edges), each bin map 1x1-convolved and
upsampled back bilinearly (align_corners=True), concatenated before the feature, a 1x1
conv, spatial dropout, then smp's segmentation head."""
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.smp.common import Conv2dReLU, SmpHead, SmpSegmentationHead, norm_type
from flaxbones.layers import BatchNorm, Conv, ModuleDef, adaptive_avg_pool, resize_bilinear


class PSPDecoder(nn.Module):
    """smp's PSPDecoder: per bin size a `psp_blocks_{i}` (adaptive average pool, 1x1
    Conv2dReLU to C / len(sizes), without norm for the 1x1 bin as smp), upsampled to the
    input's size; [bins..., x] concatenated; 1x1 Conv2dReLU `conv`; Dropout2d."""

    out_channels: int = 512
    dropout: float = 0.2
    use_norm: Any = "batchnorm"
    sizes: Sequence[int] = (1, 2, 3, 6)
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    block: ModuleDef = Conv2dReLU

    @nn.compact
    def __call__(self, x, train: bool = False):
        size, width = x.shape[1:3], x.shape[-1] // len(self.sizes)
        units = dict(conv=self.conv, norm=self.norm)
        pyramid = []
        for i, bins in enumerate(self.sizes):
            use_norm = "identity" if bins == 1 else self.use_norm
            y = self.block(width, 1, use_norm=use_norm, **units, name=f"psp_blocks_{i}")(
                adaptive_avg_pool(x, bins))
            pyramid.append(resize_bilinear(y, size, align_corners=True))
        x = jnp.concatenate([*pyramid, x], axis=-1)
        x = self.block(self.out_channels, 1, use_norm=self.use_norm, **units, name="conv")(x)
        return nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)


class SmpPSPNetHead(SmpHead):
    """smp.PSPNet's decoder and segmentation head (3x3 conv, `upsampling` x bilinear) on
    C`encoder_depth` (smp's default 3: stride 8, so `upsampling` 8 reaches the input size).
    `psp_use_batchnorm` is smp's deprecated alias of `decoder_use_norm`."""

    encoder_depth: int = 3
    psp_out_channels: int = 512
    decoder_use_norm: Any = "batchnorm"
    psp_use_batchnorm: bool | None = None
    psp_dropout: float = 0.2
    upsampling: int = 8

    min_depth = 1

    @nn.nowrap
    def check_options(self):
        super().check_options()
        norm_type(self.use_norm)

    @property
    def use_norm(self):
        return self.decoder_use_norm if self.psp_use_batchnorm is None else self.psp_use_batchnorm

    @property
    def first_level(self):
        return self.encoder_depth

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = PSPDecoder(self.psp_out_channels, self.psp_dropout, self.use_norm,
                       conv=self.conv_def(), norm=self.norm_def(train),
                       block=self.block_def(Conv2dReLU), name="decoder")(
            features[self.levels[0]], train=train)
        return self.smp_segmentation_head(3, self.upsampling)(x)


RULES = (*Conv2dReLU.torch_rules(r"decoder\.psp\.blocks\.(\d)\.pool\.1",
                                 r"head/decoder/psp_blocks_\1"),
         *Conv2dReLU.torch_rules(r"decoder\.conv", "head/decoder/conv"),
         *SmpSegmentationHead.torch_rules())
