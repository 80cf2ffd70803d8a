"""Which TFDS datasets the pipelines know, their feature keys, and loading without downloads.

A dataset other than the built-in one must already be prepared in `data_dir`:
loading never downloads, it raises `DatasetNotPreparedError` saying how to prepare it.
"""
import dataclasses
import math

import tensorflow_datasets as tfds

from flaxbones.data import builtin

IGNORE_LABEL = 255
"""The segmentation label of pixels without a class (void, padding): losses and metrics
skip it."""

# Cityscapes labelId -> trainId (19 classes), unlisted ids ignored (cityscapesScripts labels.py).
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                         23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Feature keys and splits of a TFDS dataset, and how its masks map to classes.

    Attributes:
        image_key: The image feature.
        label_key: The image-level class feature, or None (no classification).
        segmentation_key: The mask feature, or None (no segmentation).
        segmentation_classes: The class names of the (relabelled) masks.
        segmentation_map: Raw mask value -> class (unlisted values -> `IGNORE_LABEL`);
            None keeps the values as they are.
        train_split: The default training split.
        eval_split: The default evaluation split.
    """

    image_key: str = "image"
    label_key: str | None = "label"
    segmentation_key: str | None = None
    segmentation_classes: tuple[str, ...] = ()
    segmentation_map: dict[int, int] | None = None
    train_split: str = "train"
    eval_split: str = "test"

    def label_table(self) -> list[int] | None:
        """The 256-entry relabelling table of `segmentation_map`.

        Returns:
            The class of every raw value 0..255 (`IGNORE_LABEL` where unlisted), or None
                without a map.
        """
        if self.segmentation_map is None:
            return None
        return [self.segmentation_map.get(v, IGNORE_LABEL) for v in range(256)]


DATASETS = {
    "cifar10": DatasetSpec(),
    "cifar100": DatasetSpec(),
    "imagenette": DatasetSpec(eval_split="validation"),
    "imagenet2012": DatasetSpec(eval_split="validation"),
    # trimap 1 pet, 2 background, 3 border -> 0 background, 1 pet, 2 border
    "oxford_iiit_pet": DatasetSpec(segmentation_key="segmentation_mask",
                                   segmentation_classes=("background", "pet", "border"),
                                   segmentation_map={1: 1, 2: 0, 3: 2}),
    "cityscapes": DatasetSpec(image_key="image_left", label_key=None,
                              segmentation_key="segmentation_label",
                              segmentation_classes=CITYSCAPES_CLASSES,
                              segmentation_map=_CITYSCAPES_TRAIN_IDS, eval_split="validation"),
    "flaxbones_shapes": DatasetSpec(segmentation_key="segmentation_mask",
                                    segmentation_classes=builtin.CLASSES),
}
"""The datasets the pipelines know by name: their feature keys, splits and mask classes.
Another TFDS dataset gets `DatasetSpec()`'s defaults, or pass `spec=`."""
BUILTIN = ("flaxbones_shapes",)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of 'name' or 'name/config:version'; an unknown dataset gets the defaults."""
    return DATASETS.get(name.split("/")[0].split(":")[0], DatasetSpec())


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not in the data_dir; the message says how to prepare it.

    A `FileNotFoundError`: flaxbones never downloads while loading.
    """


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of `name`; the built-in dataset is generated on first use.

    Args:
        name: A TFDS name, 'name/config:version' allowed.
        data_dir: The TFDS data directory (None: TFDS's default).

    Returns:
        The prepared `tfds.core.DatasetBuilder`.

    Raises:
        DatasetNotPreparedError: The dataset is not prepared in `data_dir`.
        ValueError: TFDS does not know `name`.
    """
    builder = tfds.builder(name, data_dir=data_dir)  # unknown name: TFDS's ValueError
    if builder.is_prepared():
        return builder
    if name.split("/")[0] in BUILTIN:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
        return builder
    raise DatasetNotPreparedError(_how_to_prepare(name, builder))


def _how_to_prepare(name, builder):
    root = builder.data_dir_root
    lines = [f"TFDS dataset {name!r} is not prepared in data_dir {str(root)!r} "
             f"(no {builder.data_dir}); flaxbones never downloads while loading.",
             "Prepare it once (network needed), then pass data_dir to the pipeline:",
             f"    tfds build {name} --data_dir={root}"]
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        lines += [f"It needs a manual download first, into {root}/downloads/manual:",
                  *("    " + line.strip() for line in manual.strip().splitlines())]
    return "\n".join(lines)


def host_split(split: str, process_index: int, process_count: int) -> str:
    """This host's part of `split`: near-equal contiguous parts, none dropped.

    Args:
        split: A TFDS split name ('train', 'validation', ...).
        process_index: This host's index.
        process_count: The number of hosts.

    Returns:
        The TFDS split string of this host's part.
    """
    return tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count, drop_remainder=False)


def host_counts(builder, split: str, process_count: int) -> list[int]:
    """Examples in every host's part of `split`, computed locally on each host."""
    counts = []
    for index in range(process_count):
        n = int(builder.as_dataset(split=host_split(split, index, process_count)).cardinality())
        if n < 0:
            raise ValueError(f"{builder.name} split {split!r} has an unknown size")
        counts.append(n)
    return counts


def eval_batches(counts: list[int], local_batch: int) -> int:
    """Batches every host yields in one eval pass: enough for the largest host part."""
    return math.ceil(max(counts) / local_batch)
