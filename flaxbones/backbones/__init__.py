"""Backbone families; importing this module registers every one of them."""
from flaxbones.backbones import alexnet, googlenet, resnet, vgg

__all__ = ["alexnet", "googlenet", "resnet", "vgg"]
