"""Transfer learning: a DeepLabv3+ segmenter whose ResNet-18 backbone starts from a
flaxbones classifier checkpoint (e.g. a classification run's workdir/checkpoints):

    python experiments/train.py --config=experiments/configs/shapes_classifier.py --workdir=w/cls
    python experiments/train.py --config=experiments/configs/transfer_shapes_from_classifier.py \
        --config.init_from=w/cls/checkpoints --workdir=w/seg
"""
import ml_collections

from common import base


def get_config():
    return base(
        task="segmentation", model="deeplabv3plus",
        model_kwargs=ml_collections.ConfigDict(dict(backbone="resnet18", output_stride=16, style="tf")),
        normalize_like="resnet18", dataset="flaxbones_shapes/small", num_classes=4,
        crop_size=64, eval_size=64, scale_range=(0.75, 1.5), batch_size=16, num_steps=300,
        optimizer=ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-3,
                                                 schedule="cosine", warmup_steps=20)),
        aux_weight=0.0, init_from="", log_every=25, eval_every=150, checkpoint_every=150,
        best_metric="miou")
