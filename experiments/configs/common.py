"""Defaults every experiment config starts from; each config overrides what it needs.

Sizes (`image_size`, `crop_size`, `eval_size`) are an int (square) or (h, w), in a config
file and on the command line alike (`--config.eval_size=512`, `--config.eval_size='(512, 1024)'`).
The optimizer defaults hold only options every optimizer takes: a config on SGD lists its
own momentum/nesterov, one on AdamW/LAMB its own b1/b2/eps (see train.make_optimizer).
"""
import ml_collections
from ml_collections.config_dict import FieldReference


def size(value) -> FieldReference:
    """A config field that holds an int or an (h, w) pair."""
    return FieldReference(value, field_type=object)


def base(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"  # or "segmentation", "detection" (then set c.detection)
    c.model = "resnet50"  # any fb.list_models() name
    c.model_kwargs = ml_collections.ConfigDict()  # extra create_model kwargs (backbone=, output_stride=, ...)
    c.normalize_like = "resnet50"  # whose weight-source mean/std normalise the images
    c.dataset = "flaxbones_shapes"
    c.data_dir = ""  # TFDS data_dir holding prepared datasets ("" = TFDS's default)
    c.num_classes = 4
    c.image_size = size(224)  # classification crop
    c.crop_size = size(512)  # segmentation train crop
    c.eval_size = size(512)  # segmentation eval canvas
    c.scale_range = (0.5, 2.0)
    c.cache = False  # keep the decoded-once dataset in memory (small datasets)
    c.batch_size = 64  # global
    c.num_steps = 1000
    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.1, weight_decay=1e-4, schedule="cosine", warmup_steps=0))
    c.aux_weight = 0.4
    c.label_smoothing = 0.0
    c.bn_mode = "global"  # "frozen" for fine-tuning with running statistics, "local"
    c.precision = "fp32"  # "bf16", "fp16"
    c.init_from = ""  # a flaxbones checkpoint dir, or a weight file of init_from_model
    c.init_from_model = ""
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.best_metric = ""  # e.g. "miou" or "top1": also keep the best checkpoint
    c.num_pictures = 6
    c.seed = 0
    c.update(overrides)
    return c


def detection(**overrides) -> ml_collections.ConfigDict:
    """A detection config's input and evaluation settings (config.detection)."""
    d = ml_collections.ConfigDict()
    d.min_size = size(800)  # torchvision's resize rule: shorter side to min_size (a tuple: one
    d.max_size = 1333  # drawn per train image, the last at eval), longer side <= max_size
    d.pad_size = size((800, 1344))  # every batch padded to this (one compile); None: to
    #                                 size buckets (a bounded number of compiles)
    d.label_offset = 1  # class id = dataset label + label_offset (0 is background) ...
    d.label_map = ""  # ... or "coco": TFDS coco/2017's 80 labels -> torchvision's 91 ids
    d.max_instances = 100  # ground truth per image (more is an error naming the image)
    d.iou_types = ("bbox",)  # COCO AP kinds: bbox, segm, keypoints
    d.annotations = ""  # a COCO annotation json for evaluation ("": the pipeline's own)
    d.loss_weights = ml_collections.ConfigDict()  # e.g. {"loss_mask": 2.0}
    d.update(overrides)
    return d


def coco_recipe(learning_rate: float, train_images: int, batch: int = 16, epochs: int = 26,
                milestones=(16, 22), warmup_steps: int = 1000) -> dict:
    """torchvision's detection references schedule as base() overrides: SGD momentum 0.9,
    weight decay 1e-4, linear warmup, lr x0.1 at each milestone epoch; eval and checkpoint
    once an epoch."""
    per_epoch = train_images // batch
    return dict(
        batch_size=batch, num_steps=epochs * per_epoch,
        optimizer=ml_collections.ConfigDict(dict(
            name="sgd", learning_rate=learning_rate, momentum=0.9, nesterov=False,
            weight_decay=1e-4, schedule="step", warmup_steps=warmup_steps,
            boundaries=tuple(e * per_epoch for e in milestones))),
        log_every=100, eval_every=per_epoch, checkpoint_every=per_epoch, num_pictures=4)


def pair(size, what: str = "size") -> tuple[int, int]:
    """A config size (int, or (h, w) as a tuple or, from JSON metadata, a list) as (h, w)."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return tuple(size)
    raise ValueError(f"{what} must be an int or (h, w), got {size!r}")
