"""A seconds-long run for tests: the demo's model on 32x32 images, a few steps."""
import ml_collections

from common import base


def get_config():
    return base(
        task="segmentation", model="deeplabv3plus",
        model_kwargs=ml_collections.ConfigDict(dict(
            backbone="mobilenet_v2_050", output_stride=16, style="tf",
            head_kwargs=dict(bn_momentum=0.9))),
        normalize_like="mobilenet_v2", dataset="flaxbones_shapes/tiny", num_classes=4,
        crop_size=32, eval_size=32, scale_range=(1.0, 1.0), batch_size=4, num_steps=4,
        optimizer=ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-3)),
        aux_weight=0.0, log_every=2, eval_every=4, checkpoint_every=2, keep_checkpoints=2,
        num_pictures=2)
