"""Fine-tuning torchvision's COCO Mask R-CNN on your own instances (here the built-in
shapes; any TFDS dataset with image, objects/bbox, objects/label, objects/mask): every
weight but the class-specific layers comes from the COCO file, as in torchvision's
fine-tuning tutorial (SGD lr 0.005 momentum 0.9, weight decay 5e-4, lr x0.1 late):

    python experiments/train.py --config=experiments/configs/finetune_maskrcnn_from_coco.py \
        --config.init_from=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --workdir=workdir/finetune
"""
import ml_collections

from common import base, detection


def get_config():
    return base(
        task="detection", model="maskrcnn_resnet50_fpn", normalize_like="resnet50",
        dataset="flaxbones_shapes/instances", num_classes=4,
        detection=detection(min_size=(96, 112, 128), max_size=128, pad_size=128,
                            max_instances=8, iou_types=("bbox", "segm")),
        batch_size=4, num_steps=600,
        optimizer=ml_collections.ConfigDict(dict(
            name="sgd", learning_rate=0.005, momentum=0.9, nesterov=False, weight_decay=5e-4,
            schedule="step", warmup_steps=50, boundaries=(450,))),
        init_from_model="maskrcnn_resnet50_fpn", cache=True, log_every=25, eval_every=300,
        checkpoint_every=300, best_metric="segm/AP", num_pictures=4)
