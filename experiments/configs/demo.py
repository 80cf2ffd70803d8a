"""The demo: DeepLabv3+ (TF DeepLab style: separable ASPP and decoder) on MobileNetV2,
trained from scratch on the built-in shapes dataset, offline, in minutes on a 2-core CPU."""
import ml_collections

from common import base


def get_config():
    return base(
        task="segmentation", model="deeplabv3plus",
        model_kwargs=ml_collections.ConfigDict(dict(
            backbone="mobilenet_v2", output_stride=16, style="tf",
            head_kwargs=dict(bn_momentum=0.9))),  # TF's 0.9997 is for 100k-step runs
        normalize_like="mobilenet_v2", dataset="flaxbones_shapes/small", num_classes=4,
        crop_size=64, eval_size=64, scale_range=(0.75, 1.5), batch_size=16, num_steps=500,
        optimizer=ml_collections.ConfigDict(dict(
            name="adamw", learning_rate=3e-3, weight_decay=1e-4, schedule="cosine",
            warmup_steps=50)),
        cache=True, aux_weight=0.0, log_every=25, eval_every=250, checkpoint_every=250,
        keep_checkpoints=2,
        best_metric="miou")
