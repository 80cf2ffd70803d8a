"""Mask R-CNN ResNet-50 FPN on COCO 2017, torchvision's recipe (references/detection:
26 epochs, batch 16, SGD lr 0.02 momentum 0.9, weight decay 1e-4, lr x0.1 at epochs 16
and 22, 1000 warmup steps, ImageNet ResNet-50 backbone with 3 trainable stages, resize
to 800 / at most 1333). Store the official layout once, then point init_from at
torchvision's resnet50 ImageNet file:

    python -m flaxbones.data.coco /data/coco --data_dir=~/tensorflow_datasets
    python experiments/train.py --config=experiments/configs/coco_maskrcnn_resnet50_fpn.py \
        --config.data_dir=~/tensorflow_datasets --config.init_from=resnet50-0676ba61.pth \
        --config.detection.annotations=/data/coco/annotations/instances_val2017.json \
        --workdir=workdir/coco_maskrcnn

With the official val json, AP counts crowd regions as COCO's own evaluation does.
"""

from common import base, coco_recipe, detection

TRAIN_IMAGES = 117_266  # train2017 images with usable annotations


def get_config():
    return base(
        task="detection", model="maskrcnn_resnet50_fpn", normalize_like="resnet50",
        dataset="coco_instances", num_classes=91,
        detection=detection(min_size=800, max_size=1333, pad_size=None, max_instances=100,
                            label_offset=0, iou_types=("bbox", "segm")),
        init_from_model="resnet50", best_metric="segm/AP", **coco_recipe(0.02, TRAIN_IMAGES))
