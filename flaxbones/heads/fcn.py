"""FCN head (torchvision's FCNHead: fcn_resnet50/101, and the DeepLabv3 auxiliary head)."""
from flax import linen as nn

from flaxbones.heads.base import SegmentationHead
from flaxbones.layers import ConvNormAct


class FCNHead(SegmentationHead):
    """3x3 conv-BN-ReLU to in_channels // 4 (`conv`), dropout 0.1, 1x1 `classifier`."""

    feature: str = "C5"
    dropout: float = 0.1

    @property
    def levels(self):
        return (self.feature,)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = features[self.feature]
        x = self.block_def(ConvNormAct)(x.shape[-1] // 4, 3, conv=self.conv_def(),
                                        norm=self.norm_def(train), name="conv")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return self.classifier_def()(name="classifier")(x)

    @staticmethod
    def torch_rules(src: str = "classifier", dst: str = "head") -> tuple:
        """torchvision's FCNHead (Conv, BN, ReLU, Dropout, Conv) at `src` onto `dst`."""
        return ((rf"{src}\.0", f"{dst}/conv/conv"), (rf"{src}\.1", f"{dst}/conv/bn"),
                (rf"{src}\.4", f"{dst}/classifier"))
