"""ImageNet ResNet-50, the standard 90-epoch recipe (Goyal et al.): SGD momentum 0.9,
lr 0.1 x batch/256 with 5 warmup epochs, step decay x0.1 at epochs 30/60/80, weight
decay 1e-4 off BN and biases, batch 1024, 224 crops. Needs imagenet2012 prepared in
config.data_dir (manual download, then `tfds build imagenet2012`)."""
import ml_collections

from common import base

EPOCHS, TRAIN_EXAMPLES, BATCH = 90, 1_281_167, 1024
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH


def get_config():
    return base(
        model="resnet50", normalize_like="resnet50", dataset="imagenet2012", num_classes=1000,
        image_size=224, batch_size=BATCH, num_steps=EPOCHS * STEPS_PER_EPOCH,
        optimizer=ml_collections.ConfigDict(dict(
            name="sgd", learning_rate=0.1 * BATCH / 256, momentum=0.9, nesterov=False,
            weight_decay=1e-4, schedule="step", warmup_steps=5 * STEPS_PER_EPOCH,
            boundaries=tuple(e * STEPS_PER_EPOCH for e in (30, 60, 80)))),
        precision="bf16", log_every=100, eval_every=STEPS_PER_EPOCH,
        checkpoint_every=STEPS_PER_EPOCH, best_metric="top1")
