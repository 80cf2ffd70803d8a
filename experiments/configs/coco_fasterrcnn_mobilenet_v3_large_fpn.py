"""Faster R-CNN MobileNetV3-Large FPN on TFDS's coco/2017 (boxes only), torchvision's
recipe (26 epochs, batch 16, SGD lr 0.02 momentum 0.9, weight decay 1e-4, lr x0.1 at
epochs 16 and 22, 1000 warmup steps, ImageNet MobileNetV3-Large backbone, resize to 800 /
at most 1333):

    tfds build coco/2017 --data_dir=~/tensorflow_datasets
    python experiments/train.py \
        --config=experiments/configs/coco_fasterrcnn_mobilenet_v3_large_fpn.py \
        --config.data_dir=~/tensorflow_datasets \
        --config.init_from=mobilenet_v3_large-8738ca79.pth --workdir=workdir/coco_frcnn_mnv3
"""

from common import base, coco_recipe, detection

TRAIN_IMAGES = 118_287


def get_config():
    return base(
        task="detection", model="fasterrcnn_mobilenet_v3_large_fpn", normalize_like="mobilenet_v3_large",
        dataset="coco/2017", num_classes=91,
        detection=detection(min_size=800, max_size=1333, pad_size=None, max_instances=100,
                            label_map="coco"),
        init_from_model="mobilenet_v3_large", best_metric="bbox/AP", **coco_recipe(0.02, TRAIN_IMAGES))
