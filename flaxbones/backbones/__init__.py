"""Backbone families; importing this module registers every one of them."""
from flaxbones.backbones import resnet
from flaxbones.backbones import xception, xception_aligned

__all__ = ["resnet", "xception", "xception_aligned"]
