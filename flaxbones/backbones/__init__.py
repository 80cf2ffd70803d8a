"""Backbone families; importing this module registers every one of them."""
from flaxbones.backbones import resnet
from flaxbones.backbones import mobilenet_v1, mobilenet_v2, mobilenet_v3  # noqa: F401

__all__ = ["resnet"]
