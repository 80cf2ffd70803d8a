"""The demo: DeepLabv3+ on MobileNetV2, trained from scratch on the built-in shapes
dataset (offline). Reaches held-out mIoU >= 0.85 in a few minutes on a 2-core CPU."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "segmentation"
    c.model = "deeplabv3plus"
    c.model_kwargs = ml_collections.ConfigDict(dict(backbone="mobilenet_v2", output_stride=16))
    c.normalize_like = "mobilenet_v2"  # mean/std of this name's weight source
    c.dataset = "flaxbones_shapes/small"
    c.data_dir = ""  # default: <workdir>/../tensorflow_datasets for the built-in dataset
    c.num_classes = 4
    c.crop_size = 64
    c.eval_size = 64
    c.scale_range = (0.75, 1.5)
    c.batch_size = 16
    c.num_steps = 700
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=3e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=50))
    c.aux_weight = 0.0
    c.label_smoothing = 0.0
    c.bn_mode = "global"
    c.precision = "fp32"  # or "bf16", "fp16" (flaxbones.train.Policy.named)
    c.init_from = ""  # a checkpoint dir, or a weight file of init_from_model, for the backbone
    c.init_from_model = ""
    c.log_every = 25
    c.eval_every = 350
    c.checkpoint_every = 350
    c.keep_checkpoints = 2
    c.best_metric = "miou"
    c.num_pictures = 6
    c.seed = 0
    return c
