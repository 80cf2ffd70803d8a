"""Object detection and instance segmentation: ops, transforms and detectors (torchvision's).

Importing this package registers the detector presets and generic builders."""
from flaxbones.detection import fcos, rcnn_presets, retinanet, ssd, ssdlite  # noqa: F401
from flaxbones.detection.api import postprocess, predict, preprocess, transform_settings

__all__ = ["postprocess", "predict", "preprocess", "transform_settings"]
