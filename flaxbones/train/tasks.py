"""What a step trains for: the loss and the metrics of a batch, and its input checks.

A batch is a dict in the data pipelines' format (flaxbones.data): 'image' (N, H, W, C)
float; 'label' (N,) class ids for classification or 'segmentation' (N, H, W) pixel ids
for segmentation; optionally 'valid' (N,), False/0 for padded examples.
"""
import dataclasses

from flaxbones.train import losses, metrics


def _check_common(batch, label_key):
    for key in ("image", label_key):
        if key not in batch:
            raise KeyError(f"the batch needs an {key!r} entry; it has {sorted(batch)}")
    image, label = batch["image"], batch[label_key]
    if image.ndim != 4:
        raise ValueError(f"batch['image'] must be NHWC, got shape {image.shape}")
    if label.shape[:1] != image.shape[:1]:
        raise ValueError(f"batch[{label_key!r}] {label.shape} and batch['image'] {image.shape} "
                         "have different batch sizes")
    if "valid" in batch and batch["valid"].shape != image.shape[:1]:
        raise ValueError(f"batch['valid'] must have shape {image.shape[:1]}, "
                         f"got {batch['valid'].shape}")


@dataclasses.dataclass(frozen=True)
class Classification:
    """Softmax cross-entropy with label smoothing; top-k accuracy. Labels: batch['label']."""

    label_smoothing: float = 0.0
    topk: tuple[int, ...] = (1, 5)
    label_key = "label"

    def check(self, batch):
        _check_common(batch, self.label_key)
        if batch["label"].ndim != 1:
            raise ValueError(f"classification labels must be (N,), got {batch['label'].shape}")

    def _mask(self, batch):
        return losses.example_mask(batch, batch["label"].shape[0])

    def count(self, batch):
        return self._mask(batch).sum()

    def loss(self, outputs, batch):
        return losses.softmax_cross_entropy(outputs, batch["label"], self.label_smoothing,
                                            self._mask(batch))

    def metrics(self, outputs, batch):
        return metrics.topk_correct(outputs, batch["label"], self.topk, self._mask(batch))


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Per-pixel cross-entropy ignoring `ignore_label`, aux loss weighted `aux_weight`;
    a confusion matrix giving mIoU and pixel accuracy. Labels: batch['segmentation']."""

    num_classes: int
    ignore_label: int = 255
    aux_weight: float = 0.4
    label_key = "segmentation"

    def check(self, batch):
        _check_common(batch, self.label_key)
        labels = batch["segmentation"]
        if labels.shape != batch["image"].shape[:3]:
            raise ValueError(f"segmentation labels must be (N, H, W) = "
                             f"{batch['image'].shape[:3]}, got {labels.shape}")

    def _weights(self, batch):
        labels = batch["segmentation"]
        return losses.pixel_weights(labels, self.ignore_label,
                                    losses.example_mask(batch, labels.shape[0]))

    def count(self, batch):
        return self._weights(batch).sum()

    def loss(self, outputs, batch):
        labels = batch["segmentation"]
        return losses.segmentation_cross_entropy(outputs, labels, self.ignore_label,
                                                 self.aux_weight,
                                                 losses.example_mask(batch, labels.shape[0]))

    def metrics(self, outputs, batch):
        logits = outputs["out"] if isinstance(outputs, dict) else outputs
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the task {self.num_classes}")
        return {"confusion": metrics.confusion_matrix(logits.argmax(-1), batch["segmentation"],
                                                      self.num_classes, self._weights(batch))}
