"""Backbone families; importing this module registers every one of them."""
from flaxbones.backbones import resnet

__all__ = ["resnet"]
