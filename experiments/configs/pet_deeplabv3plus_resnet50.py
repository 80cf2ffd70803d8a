"""Oxford-IIIT Pet trimaps (background / pet / border) with DeepLabv3+ on ResNet-50 at
output stride 16, backbone started from torchvision ImageNet weights when
config.init_from points at resnet50's .pth/.safetensors file. Needs oxford_iiit_pet
prepared in config.data_dir."""
import ml_collections

from common import base


def get_config():
    return base(
        task="segmentation", model="deeplabv3plus",
        model_kwargs=ml_collections.ConfigDict(dict(backbone="resnet50", output_stride=16)),
        normalize_like="resnet50", dataset="oxford_iiit_pet", num_classes=3,
        crop_size=320, eval_size=512, batch_size=16, num_steps=15_000,
        optimizer=ml_collections.ConfigDict(dict(
            name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4, schedule="cosine",
            warmup_steps=500)),
        aux_weight=0.0, init_from_model="resnet50", eval_every=1000, checkpoint_every=1000,
        best_metric="miou")
