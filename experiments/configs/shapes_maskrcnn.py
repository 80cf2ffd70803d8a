"""The detection demo: Mask R-CNN on a ResNet-18 FPN, trained from scratch on the built-in
overlapping-shapes instances, offline, in minutes on a 2-core CPU; COCO box and mask AP."""
import ml_collections

from common import base, detection


def get_config():
    return base(
        task="detection", model="maskrcnn",
        model_kwargs=ml_collections.ConfigDict(dict(
            backbone="resnet18", frozen_bn=False, fpn_channels=64, representation_size=256,
            mask_channels=32, mask_dim_reduced=32, roi_align="matmul",
            anchor_sizes=((16,), (32,), (64,), (96,), (128,)),
            rpn_pre_nms_top_n=300, rpn_post_nms_top_n=100,
            rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
            box_batch_size_per_image=128, rpn_batch_size_per_image=128,
            detections_per_img=20)),
        normalize_like="resnet18", dataset="flaxbones_shapes/instances", num_classes=4,
        detection=detection(min_size=96, max_size=96, pad_size=96, max_instances=8,
                            iou_types=("bbox", "segm")),
        batch_size=8, num_steps=450,
        optimizer=ml_collections.ConfigDict(dict(
            name="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine",
            warmup_steps=50)),
        cache=True, log_every=25, eval_every=225, checkpoint_every=225, keep_checkpoints=2,
        best_metric="segm/AP")
