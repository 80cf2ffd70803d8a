"""Lite R-ASPP (torchvision's LRASPPHead, lraspp_mobilenet_v3_large)."""
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.base import SegmentationHead
from flaxbones.layers import ConvNormAct, resize_bilinear


class LRASPPHead(SegmentationHead):
    """`high` (C5): 1x1 conv-BN-ReLU (`cbr`) gated by sigmoid(1x1 conv of its global mean)
    (`scale`), upsampled to `low` (C3) and classified (`high_classifier`), plus a 1x1
    `low_classifier` on `low`; logits at the stride of `low`."""

    low: str = "C3"
    high: str = "C5"
    inter_channels: int = 128

    @property
    def levels(self):
        return (self.low, self.high)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        low, high = features[self.low], features[self.high]
        conv = self.conv_def()
        x = self.block_def(ConvNormAct)(self.inter_channels, 1, conv=conv,
                                        norm=self.norm_def(train), name="cbr")(high)
        pooled = jnp.mean(high.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(high.dtype)
        x = x * nn.sigmoid(conv(self.inter_channels, (1, 1), name="scale")(pooled))
        x = resize_bilinear(x, low.shape[1:3])
        classifier = self.classifier_def()
        return classifier(name="low_classifier")(low) + classifier(name="high_classifier")(x)

    @staticmethod
    def torch_rules() -> tuple:
        """torchvision's LRASPPHead at `classifier`."""
        return ((r"classifier\.cbr\.0", "head/cbr/conv"), (r"classifier\.cbr\.1", "head/cbr/bn"),
                (r"classifier\.scale\.1", "head/scale"),
                (r"classifier\.(low|high)_classifier", r"head/\1_classifier"))
