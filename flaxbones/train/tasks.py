"""What a step trains for: the loss and the metrics of a batch, and its input checks.

A batch is a dict in the data pipelines' format (flaxbones.data): 'image' (N, H, W, C)
float; 'label' (N,) class ids for classification or 'segmentation' (N, H, W) pixel ids
for segmentation; optionally 'valid' (N,), False/0 for padded examples.

Model outputs follow flaxbones' output contract: a dict with the main logits under
'out' and any auxiliary logits (a segmenter's 'aux', GoogLeNet's 'aux1'/'aux2') beside
them. Every auxiliary output adds `aux_weight` x its own loss; metrics read 'out'.
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


def _main_and_aux(outputs) -> tuple:
    """(the main logits, [auxiliary logits]) of a model's outputs."""
    if not isinstance(outputs, dict) or "out" not in outputs:
        raise TypeError("model outputs must be a dict with the logits under 'out' (and any "
                        f"auxiliary outputs beside them); got {type(outputs).__name__}")
    return outputs["out"], [v for k, v in sorted(outputs.items()) if k != "out"]


def _with_aux(outputs, loss, aux_weight):
    """(sum, count) of `loss` on the main output plus `aux_weight` x each auxiliary one."""
    main, aux = _main_and_aux(outputs)
    total, count = loss(main)
    for logits in aux if aux_weight else ():
        total = total + aux_weight * loss(logits)[0]
    return total, count


class Task:
    """What the steps ask of a task: `check(batch)`, `count(batch)` (examples the loss
    averages over), `loss(outputs, batch) -> (sum, count)`, `metrics(outputs, batch)` (sums),
    and `model_inputs(batch, train) -> (args, kwargs)`, what the model takes besides the
    images (nothing here; a detector's image sizes and targets)."""

    losses_need_train_mode = False  # True: the model gives losses only with train=True

    def model_inputs(self, batch, train: bool):
        return (), {}


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Softmax cross-entropy with label smoothing, plus `aux_weight` (GoogLeNet's 0.3) x
    that of each auxiliary output; top-k accuracy. Labels: batch['label']."""

    label_smoothing: float = 0.0
    topk: tuple[int, ...] = (1, 5)
    aux_weight: float = 0.3
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
        def loss(logits):
            return losses.softmax_cross_entropy(logits, batch["label"], self.label_smoothing,
                                                self._mask(batch))
        return _with_aux(outputs, loss, self.aux_weight)

    def metrics(self, outputs, batch):
        logits, _ = _main_and_aux(outputs)
        return metrics.topk_correct(logits, batch["label"], self.topk, self._mask(batch))


@dataclasses.dataclass(frozen=True)
class Segmentation(Task):
    """Per-pixel cross-entropy ignoring `ignore_label`, plus `aux_weight` x that of each
    auxiliary output; a confusion matrix giving mIoU and pixel accuracy.
    Labels: batch['segmentation']."""

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
        mask = losses.example_mask(batch, labels.shape[0])

        def loss(logits):
            return losses.segmentation_cross_entropy(logits, labels, self.ignore_label, mask)
        return _with_aux(outputs, loss, self.aux_weight)

    def metrics(self, outputs, batch):
        logits, _ = _main_and_aux(outputs)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the task {self.num_classes}")
        preds = metrics.predictions(logits)  # -1 where logits are not finite: a miss
        return {"confusion": metrics.confusion_matrix(preds, batch["segmentation"],
                                                      self.num_classes, self._weights(batch))}


TARGET_KEYS = ("boxes", "labels", "instance_valid", "masks", "keypoints")


@dataclasses.dataclass(frozen=True)
class Detection(Task):
    """A detector's training loss: the sum of its loss terms (torchvision's loss dict, each
    scaled by `loss_weights.get(name, 1)`), every term also reported as a metric.

    Batch (flaxbones.data.detection): 'image', 'image_size' (N, 2) valid (h, w), padded
    ground truth 'boxes' (N, G, 4) xyxy, 'labels' (N, G), 'instance_valid' (N, G), optional
    'masks' (N, G, H, W) and 'keypoints' (N, G, K, 3). Every example of a training batch
    must be a real image (the training streams drop the remainder): the detectors' losses
    are means over the batch, as torchvision's. Evaluation is COCO AP over whole splits
    (flaxbones.detection.coco_eval), not a per-batch metric.
    """

    loss_weights: tuple[tuple[str, float], ...] = ()
    label_key = "boxes"
    losses_need_train_mode = True

    def check(self, batch):
        _check_common(batch, self.label_key)
        for key in ("image_size", "labels", "instance_valid"):
            if key not in batch:
                raise KeyError(f"a detection batch needs {key!r}; it has {sorted(batch)}")
        n, g = batch["boxes"].shape[:2]
        if batch["boxes"].shape != (n, g, 4):
            raise ValueError(f"batch['boxes'] must be (N, G, 4), got {batch['boxes'].shape}")
        for key in ("labels", "instance_valid"):
            if batch[key].shape != (n, g):
                raise ValueError(f"batch[{key!r}] must be (N, G) = {(n, g)} like the boxes, got "
                                 f"{batch[key].shape}")
        if batch["image_size"].shape != (n, 2):
            raise ValueError(f"batch['image_size'] must be (N, 2), got {batch['image_size'].shape}")

    def model_inputs(self, batch, train: bool):
        if not train:
            return (batch["image_size"],), {}
        targets = {k: batch[k] for k in TARGET_KEYS if k in batch}
        return (batch["image_size"],), {"targets": targets}

    def count(self, batch):
        return losses.example_mask(batch, batch["boxes"].shape[0]).sum()

    def _terms(self, outputs):
        if not isinstance(outputs, dict) or "boxes" in outputs:
            raise TypeError("a detector in train mode returns its loss terms (a dict of "
                            "scalars); got detections: was it called with train=True and "
                            "targets?")
        weights = dict(self.loss_weights)
        unknown = sorted(set(weights) - set(outputs))
        if unknown:
            raise ValueError(f"loss_weights name {unknown}, which this detector does not "
                             f"compute; its terms are {sorted(outputs)}")
        return {k: v * weights.get(k, 1.0) for k, v in outputs.items()}

    def loss(self, outputs, batch):
        count = self.count(batch)
        return sum(self._terms(outputs).values()) * count, count

    def metrics(self, outputs, batch):
        count = self.count(batch)
        return {f"{k}_sum": v * count for k, v in self._terms(outputs).items()}
