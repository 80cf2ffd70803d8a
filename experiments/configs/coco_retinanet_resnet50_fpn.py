"""RetinaNet ResNet-50 FPN on TFDS's coco/2017 (boxes only), torchvision's recipe
(26 epochs, batch 16, SGD lr 0.01 momentum 0.9, weight decay 1e-4, lr x0.1 at epochs 16
and 22, 1000 warmup steps, ImageNet ResNet-50 backbone). TFDS's 80 labels map to
torchvision's 91 category ids:

    tfds build coco/2017 --data_dir=~/tensorflow_datasets
    python experiments/train.py --config=experiments/configs/coco_retinanet_resnet50_fpn.py \
        --config.data_dir=~/tensorflow_datasets --config.init_from=resnet50-0676ba61.pth \
        --workdir=workdir/coco_retinanet
"""

from common import base, coco_recipe, detection

TRAIN_IMAGES = 118_287


def get_config():
    return base(
        task="detection", model="retinanet_resnet50_fpn", normalize_like="resnet50",
        dataset="coco/2017", num_classes=91,
        detection=detection(min_size=800, max_size=1333, pad_size=None, max_instances=100,
                            label_map="coco"),
        init_from_model="resnet50", best_metric="bbox/AP", **coco_recipe(0.01, TRAIN_IMAGES))
