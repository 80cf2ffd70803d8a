"""What a step trains for: the loss and the metrics of a batch, and its input checks.

A batch is a dict: 'image' (N, H, W, C) float, 'label' ((N,) class ids or (N, H, W)
pixel ids) and optionally 'mask' (N,) with 0 for padded examples.
"""
import dataclasses

from flaxbones.train import losses, metrics


def _check_common(batch):
    for key in ("image", "label"):
        if key not in batch:
            raise KeyError(f"the batch needs an {key!r} entry; it has {sorted(batch)}")
    image, label = batch["image"], batch["label"]
    if image.ndim != 4:
        raise ValueError(f"batch['image'] must be NHWC, got shape {image.shape}")
    if label.shape[:1] != image.shape[:1]:
        raise ValueError(f"batch['label'] {label.shape} and batch['image'] {image.shape} "
                         "have different batch sizes")
    if "mask" in batch and batch["mask"].shape != image.shape[:1]:
        raise ValueError(f"batch['mask'] must have shape {image.shape[:1]}, got {batch['mask'].shape}")


@dataclasses.dataclass(frozen=True)
class Classification:
    """Softmax cross-entropy with label smoothing; top-k accuracy."""

    label_smoothing: float = 0.0
    topk: tuple[int, ...] = (1, 5)

    def check(self, batch):
        _check_common(batch)
        if batch["label"].ndim != 1:
            raise ValueError(f"classification labels must be (N,), got {batch['label'].shape}")

    def count(self, batch):
        return losses.example_mask(batch, batch["label"].shape[0]).sum()

    def loss(self, outputs, batch):
        return losses.softmax_cross_entropy(outputs, batch["label"], self.label_smoothing,
                                            losses.example_mask(batch, batch["label"].shape[0]))

    def metrics(self, outputs, batch):
        return metrics.topk_correct(outputs, batch["label"], self.topk,
                                    losses.example_mask(batch, batch["label"].shape[0]))


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Per-pixel cross-entropy ignoring `ignore_label`, aux loss weighted `aux_weight`;
    a confusion matrix giving mIoU and pixel accuracy."""

    num_classes: int
    ignore_label: int = 255
    aux_weight: float = 0.4

    def check(self, batch):
        _check_common(batch)
        if batch["label"].shape != batch["image"].shape[:3]:
            raise ValueError(f"segmentation labels must be (N, H, W) = {batch['image'].shape[:3]}, "
                             f"got {batch['label'].shape}")

    def _weights(self, batch):
        n = batch["label"].shape[0]
        return losses.pixel_weights(batch["label"], self.ignore_label, losses.example_mask(batch, n))

    def count(self, batch):
        return self._weights(batch).sum()

    def loss(self, outputs, batch):
        n = batch["label"].shape[0]
        return losses.segmentation_cross_entropy(outputs, batch["label"], self.ignore_label,
                                                 self.aux_weight, losses.example_mask(batch, n))

    def metrics(self, outputs, batch):
        logits = outputs["out"] if isinstance(outputs, dict) else outputs
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the task {self.num_classes}")
        preds = logits.argmax(-1)
        return {"confusion": metrics.confusion_matrix(preds, batch["label"], self.num_classes,
                                                      self._weights(batch))}
