"""What a step trains for: the loss and the metrics of a batch, and its input checks.

A batch is a dict in the data pipelines' format (flaxbones.data): 'image' (N, H, W, C)
float; 'label' (N,) class ids for classification or 'segmentation' (N, H, W) pixel ids
for segmentation; optionally 'valid' (N,), False/0 for padded examples.

Model outputs follow flaxbones' output contract: a dict with the main logits under
'out' and any auxiliary logits (a segmenter's 'aux', GoogLeNet's 'aux1'/'aux2') beside
them. Every auxiliary output adds `aux_weight` x its own loss; metrics read 'out'.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

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
    """What the steps ask of a task (the base of Classification, Segmentation, Detection).

    A task implements `check(batch)` (raising on a malformed batch), `count(batch)` (the
    examples, or pixels, the loss averages over), `loss(outputs, batch) -> (sum, count)`,
    `metrics(outputs, batch)` (a dict of sums, added over batches and finished by
    `summarize`) and `model_inputs(batch, train)`. `losses_need_train_mode` is True where
    the model gives losses only with train=True (detectors).
    """

    losses_need_train_mode = False  # True: the model gives losses only with train=True

    def model_inputs(self, batch: Mapping[str, Any], train: bool) -> tuple[tuple, dict]:
        """What the model takes besides the images.

        Args:
            batch: The batch dict.
            train: Whether the call is a training one.

        Returns:
            (positional args, keyword args) after the images, both empty here; a
                detector's image sizes (and, in training, its targets).
        """
        return (), {}


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Softmax cross-entropy (with label smoothing) and top-k accuracy; labels batch['label'].

    Each auxiliary output (GoogLeNet's 'aux1', 'aux2') adds `aux_weight` x its own loss.

    Attributes:
        label_smoothing: The smoothing a: targets (1 - a) one-hot + a / C.
        topk: The k of the 'top{k}' correct counts (those up to the class count).
        aux_weight: The weight of each auxiliary output's loss (GoogLeNet's 0.3).
    """

    label_smoothing: float = 0.0
    topk: tuple[int, ...] = (1, 5)
    aux_weight: float = 0.3
    label_key = "label"

    def check(self, batch: Mapping[str, Any]) -> None:
        """Check the batch's entries and shapes before it is traced.

        Args:
            batch: The batch dict (flaxbones.data's format).

        Raises:
            KeyError: 'image' or 'label' is missing.
            ValueError: An entry has the wrong rank or shape
                (labels (N,)), or the batch sizes differ.
        """
        _check_common(batch, self.label_key)
        if batch["label"].ndim != 1:
            raise ValueError(f"classification labels must be (N,), got {batch['label'].shape}")

    def _mask(self, batch):
        return losses.example_mask(batch, batch["label"].shape[0])

    def count(self, batch: Mapping[str, Any]) -> jax.Array:
        """The number the loss is averaged over: the valid examples.

        Args:
            batch: The batch dict (flaxbones.data's format).

        Returns:
            A float32 scalar.
        """
        return self._mask(batch).sum()

    def loss(self, outputs: Mapping[str, Any],
             batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """The summed loss of the batch: cross-entropy of 'out' and the auxiliary outputs.

        Args:
            outputs: The model's output dict ('out' logits (N, C)).
            batch: The batch dict (flaxbones.data's format).

        Returns:
            (loss sum, count), float32 scalars; their ratio is the mean loss.

        Raises:
            TypeError: `outputs` is not a dict with 'out'.
            ValueError: The logits are not (N, C) for (N,) labels.
        """
        def loss(logits):
            return losses.softmax_cross_entropy(logits, batch["label"], self.label_smoothing,
                                                self._mask(batch))
        return _with_aux(outputs, loss, self.aux_weight)

    def metrics(self, outputs: Mapping[str, Any],
                batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The metric sums of the batch: top-k correct counts of 'out'.

        Args:
            outputs: The model's output dict ('out' logits (N, C)).
            batch: The batch dict (flaxbones.data's format).

        Returns:
            A dict of 'top1', 'top5', ... counts of valid examples whose label is within
                the top k.
        """
        logits, _ = _main_and_aux(outputs)
        return metrics.topk_correct(logits, batch["label"], self.topk, self._mask(batch))


@dataclasses.dataclass(frozen=True)
class Segmentation(Task):
    """Per-pixel cross-entropy ignoring `ignore_label`; mIoU and pixel accuracy.

    Labels are batch['segmentation'] (N, H, W); each auxiliary output (a segmenter's
    'aux') adds `aux_weight` x its own loss. The metric is a confusion matrix.

    Attributes:
        num_classes: The model's class count (the confusion matrix's size).
        ignore_label: The label of pixels left out of loss and metrics (255: void,
            padding).
        aux_weight: The weight of the auxiliary output's loss (torchvision's 0.4).
    """

    num_classes: int
    ignore_label: int = 255
    aux_weight: float = 0.4
    label_key = "segmentation"

    def check(self, batch: Mapping[str, Any]) -> None:
        """Check the batch's entries and shapes before it is traced.

        Args:
            batch: The batch dict (flaxbones.data's format).

        Raises:
            KeyError: 'image' or 'segmentation' is missing.
            ValueError: An entry has the wrong rank or shape
                (labels (N, H, W), the images'), or the batch sizes differ.
        """
        _check_common(batch, self.label_key)
        labels = batch["segmentation"]
        if labels.shape != batch["image"].shape[:3]:
            raise ValueError(f"segmentation labels must be (N, H, W) = "
                             f"{batch['image'].shape[:3]}, got {labels.shape}")

    def _weights(self, batch):
        labels = batch["segmentation"]
        return losses.pixel_weights(labels, self.ignore_label,
                                    losses.example_mask(batch, labels.shape[0]))

    def count(self, batch: Mapping[str, Any]) -> jax.Array:
        """The number the loss is averaged over: the labelled pixels of valid examples.

        Args:
            batch: The batch dict (flaxbones.data's format).

        Returns:
            A float32 scalar.
        """
        return self._weights(batch).sum()

    def loss(self, outputs: Mapping[str, Any],
             batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """The summed loss of the batch: per-pixel cross-entropy of 'out' and the auxiliary outputs.

        Args:
            outputs: The model's output dict ('out' logits (N, H, W, C)).
            batch: The batch dict (flaxbones.data's format).

        Returns:
            (loss sum, count), float32 scalars; their ratio is the mean loss.

        Raises:
            TypeError: `outputs` is not a dict with 'out'.
            ValueError: The logits do not match the (N, H, W) labels.
        """
        labels = batch["segmentation"]
        mask = losses.example_mask(batch, labels.shape[0])

        def loss(logits):
            return losses.segmentation_cross_entropy(logits, labels, self.ignore_label, mask)
        return _with_aux(outputs, loss, self.aux_weight)

    def metrics(self, outputs: Mapping[str, Any],
                batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The metric sums of the batch: the confusion matrix of 'out'.

        Args:
            outputs: The model's output dict ('out' logits (N, H, W, C)).
            batch: The batch dict (flaxbones.data's format).

        Returns:
            A dict with 'confusion', int32 (num_classes, num_classes + 1) counts, rows
                the true class, the last column no valid prediction.

        Raises:
            ValueError: The logits' class count is not `num_classes`.
        """
        logits, _ = _main_and_aux(outputs)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the task {self.num_classes}")
        preds = metrics.predictions(logits)  # -1 where logits are not finite: a miss
        return {"confusion": metrics.confusion_matrix(preds, batch["segmentation"],
                                                      self.num_classes, self._weights(batch))}


TARGET_KEYS = ("boxes", "labels", "instance_valid", "masks", "keypoints")


@dataclasses.dataclass(frozen=True)
class Detection(Task):
    """A detector's training loss: the sum of its loss terms, each also reported as a metric.

    The terms are torchvision's loss dict, each scaled by `loss_weights.get(name, 1)`.
    Batch (flaxbones.data.detection): 'image', 'image_size' (N, 2) valid (h, w), padded
    ground truth 'boxes' (N, G, 4) xyxy, 'labels' (N, G), 'instance_valid' (N, G),
    optional 'masks' (N, G, H, W) and 'keypoints' (N, G, K, 3). Every example of a
    training batch must be a real image (the training streams drop the remainder): the
    detectors' losses are means over the batch, as torchvision's. Evaluation is COCO AP
    over whole splits (flaxbones.detection.coco_eval), not a per-batch metric.

    Attributes:
        loss_weights: (term name, weight) pairs, e.g. (('loss_mask', 2.0),).
    """

    loss_weights: tuple[tuple[str, float], ...] = ()
    label_key = "boxes"
    losses_need_train_mode = True

    def check(self, batch: Mapping[str, Any]) -> None:
        """Check the batch's entries and shapes before it is traced.

        Args:
            batch: The batch dict (flaxbones.data's format).

        Raises:
            KeyError: 'image' or 'boxes', 'image_size', 'labels' or 'instance_valid' is missing.
            ValueError: An entry has the wrong rank or shape, or the batch sizes differ.
        """
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

    def model_inputs(self, batch: Mapping[str, Any], train: bool) -> tuple[tuple, dict]:
        """The detector's inputs besides the images.

        Args:
            batch: The batch dict.
            train: Whether the call is a training one.

        Returns:
            ((image_size,), {}) in inference, and ((image_size,), dict(targets=...)) in
                training, the targets being the batch's 'boxes', 'labels',
                'instance_valid', and 'masks' / 'keypoints' when present.
        """
        if not train:
            return (batch["image_size"],), {}
        targets = {k: batch[k] for k in TARGET_KEYS if k in batch}
        return (batch["image_size"],), {"targets": targets}

    def count(self, batch: Mapping[str, Any]) -> jax.Array:
        """The number the loss is averaged over: the valid examples.

        Args:
            batch: The batch dict (flaxbones.data's format).

        Returns:
            A float32 scalar.
        """
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

    def loss(self, outputs: Mapping[str, Any],
             batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """The summed loss of the batch: the weighted sum of the detector's terms, times the count.

        Args:
            outputs: The model's output dict (in train mode, the loss terms).
            batch: The batch dict (flaxbones.data's format).

        Returns:
            (loss sum, count), float32 scalars; their ratio is the mean loss.

        Raises:
            TypeError: `outputs` are detections, not loss terms (not called with
                train=True and targets).
            ValueError: `loss_weights` names a term the detector does not compute.
        """
        count = self.count(batch)
        return sum(self._terms(outputs).values()) * count, count

    def metrics(self, outputs: Mapping[str, Any],
                batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The metric sums of the batch: each weighted loss term times the count.

        Args:
            outputs: The model's output dict (in train mode, the loss terms).
            batch: The batch dict (flaxbones.data's format).

        Returns:
            A dict of '<term>_sum' per loss term; `summarize` makes them means.
        """
        count = self.count(batch)
        return {f"{k}_sum": v * count for k, v in self._terms(outputs).items()}
