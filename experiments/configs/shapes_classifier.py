"""A ResNet-18 classifier of the built-in shapes (label = the largest shape), the source
checkpoint for transfer_shapes_from_classifier.py."""
import ml_collections

from common import base


def get_config():
    return base(
        model="resnet18", normalize_like="resnet18", dataset="flaxbones_shapes/small",
        num_classes=4, image_size=64, batch_size=32, num_steps=300,
        optimizer=ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-3,
                                                 schedule="cosine", warmup_steps=20)),
        log_every=25, eval_every=150, checkpoint_every=150, best_metric="top1")
