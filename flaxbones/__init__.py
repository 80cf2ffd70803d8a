"""flaxbones: vision backbones and heads as pure Flax Linen modules."""
from flaxbones import backbones as _backbones  # noqa: F401  (registers the families)
from flaxbones import classifiers as _classifiers  # noqa: F401  (their classifier heads)
from flaxbones import segmenters as _segmenters  # noqa: F401  (registers segmenters)
from flaxbones import detection  # noqa: F401  (registers detectors)
from flaxbones import nnx  # noqa: F401  (fb.nnx.to_nnx)
from flaxbones import smp  # noqa: F401  (registers smp_<decoder>: segmentation_models_pytorch's)
from flaxbones.exporting import export, load_exported
from flaxbones.features import FeatureInfo
from flaxbones.models import Classifier, Segmenter
from flaxbones.registry import (create_backbone, create_model, get_spec, list_backbones,
                                list_models)
from flaxbones.scan import scan_variables, unscan_variables
from flaxbones.transforms import class_names, imagenet_classes, preprocess
from flaxbones.weights import load_pretrained, save_weights

from flaxbones._version import __version__  # noqa: F401  (one place; pyproject.toml reads it)

__all__ = ["Classifier", "FeatureInfo", "Segmenter", "class_names", "create_backbone",
           "create_model", "export", "get_spec", "imagenet_classes", "list_backbones",
           "list_models", "load_exported", "load_pretrained", "nnx", "preprocess", "save_weights",
           "scan_variables", "smp", "unscan_variables"]
