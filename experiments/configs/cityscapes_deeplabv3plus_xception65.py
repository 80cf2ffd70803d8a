"""Cityscapes (19 train classes) with DeepLabv3+ on Xception-65 at output stride 16,
TF DeepLab style, 769x769 crops, batch 8 (the paper used 16), poly-like cosine decay.
Needs cityscapes prepared in config.data_dir (manual download)."""
import ml_collections

from common import base


def get_config():
    return base(
        task="segmentation", model="deeplabv3plus",
        model_kwargs=ml_collections.ConfigDict(dict(
            backbone="xception65", output_stride=16, style="tf")),
        normalize_like="xception65", dataset="cityscapes", num_classes=19,
        crop_size=769, eval_size=(1024, 2048), batch_size=8, num_steps=90_000,
        optimizer=ml_collections.ConfigDict(dict(
            name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=4e-5, schedule="cosine",
            warmup_steps=1000)),
        aux_weight=0.0, init_from_model="xception65", precision="bf16", eval_every=5000,
        checkpoint_every=2000, best_metric="miou")
