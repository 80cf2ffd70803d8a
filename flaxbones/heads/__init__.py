"""Task heads: they turn a backbone's feature dict into outputs."""
from flaxbones.heads.aspp import ASPP, atrous_rates_for
from flaxbones.heads.base import SegmentationHead
from flaxbones.heads.classification import ClassifierHead, FCHead
from flaxbones.heads.deeplab import DeepLabV3Head, DeepLabV3PlusHead, deeplab_style
from flaxbones.heads.fcn import FCNHead
from flaxbones.heads.fpn import FPN, SemanticFPNHead
from flaxbones.heads.lraspp import LRASPPHead
from flaxbones.heads.unet import UNetHead

__all__ = ["ASPP", "ClassifierHead", "DeepLabV3Head", "DeepLabV3PlusHead", "FCHead", "FCNHead",
           "FPN", "LRASPPHead", "SegmentationHead", "SemanticFPNHead", "UNetHead",
           "atrous_rates_for", "deeplab_style"]
