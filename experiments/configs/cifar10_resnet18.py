"""CIFAR-10 with ResNet-18 (ImageNet stem, 32x32 inputs upsampled to 64): SGD, cosine,
200 epochs. Needs cifar10 prepared in config.data_dir (`tfds build cifar10`)."""
import ml_collections

from common import base

EPOCHS, TRAIN_EXAMPLES, BATCH = 200, 50_000, 128


def get_config():
    return base(
        model="resnet18", normalize_like="resnet18", dataset="cifar10", num_classes=10,
        image_size=64, batch_size=BATCH, num_steps=EPOCHS * TRAIN_EXAMPLES // BATCH,
        optimizer=ml_collections.ConfigDict(dict(
            name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
            schedule="cosine", warmup_steps=0)),
        eval_every=TRAIN_EXAMPLES // BATCH * 5, checkpoint_every=TRAIN_EXAMPLES // BATCH * 5,
        best_metric="top1")
