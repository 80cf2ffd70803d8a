"""Task heads: they turn a backbone's feature dict into outputs."""
from flaxbones.heads.classification import ClassifierHead, FCHead

__all__ = ["ClassifierHead", "FCHead"]
