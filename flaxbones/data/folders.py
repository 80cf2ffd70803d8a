"""Folders of image files written once as TFDS datasets the pipelines read by name.

    root/train/<class>/<image>, root/test/<class>/<image>           store_image_folder
    root/train/images/<stem>.jpg + root/train/masks/<stem>.png, ...  store_segmentation_folder

The pipelines read prepared TFDS datasets (host parts, shuffled pieces, exact resume), so
a folder is stored once; later calls and other processes find it by name in `data_dir`.
"""
from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from flaxbones.data.stored import store

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
"""The image files a folder may hold (case-insensitive); other files are ignored."""


def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _split_folders(root, splits) -> dict[str, pathlib.Path]:
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {str(root)!r}")
    splits = splits or {p.name: p.name for p in sorted(root.iterdir()) if p.is_dir()}
    folders = {name: root / folder for name, folder in splits.items()}
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing or not folders:
        raise FileNotFoundError(f"{str(root)!r} has no split folders {missing or ''}: expected "
                                f"root/<split>/... (e.g. train/ and test/)")
    return folders


def store_image_folder(root: str | pathlib.Path, name: str, data_dir: str, *,
                       splits: dict[str, str] | None = None,
                       version: str = "1.0.0") -> tfds.core.DatasetBuilder:
    """Store a classification folder, `root/<split>/<class>/<image>`, as the TFDS dataset
    `name` in `data_dir`, once (a later call finds it there).

    The files are stored as they are, not re-encoded, and decoded as 3-channel RGB when
    read (grayscale and RGBA files included). The classes are the class folders of all
    splits together, sorted, so a class missing from one split keeps its index.

    Args:
        root: The folder.
        name: The dataset's name, e.g. "my_flowers"; read with
            `classification_pipeline(name, data_dir=data_dir, ...)`.
        data_dir: The TFDS data directory to write to.
        splits: {TFDS split name: folder under root}; default: every folder of root by
            its own name (train/, test/, validation/ ...).
        version: The dataset version.

    Returns:
        The prepared `tfds.core.DatasetBuilder`.

    Raises:
        FileNotFoundError: `root`, a split folder, or any image in a class folder is
            missing.
        ValueError: `name` is a TFDS builder's (it would read back as that dataset).
    """
    def make():
        folders = _split_folders(root, splits)
        classes = sorted({c.name for f in folders.values() for c in f.iterdir() if c.is_dir()})
        if not classes:
            raise FileNotFoundError(f"{str(root)!r} has no class folders: expected "
                                    f"root/<split>/<class>/<image>")
        out = {}
        for split, folder in folders.items():
            files = [(path, c) for c in classes if (folder / c).is_dir()
                     for path in _images_in(folder / c)]
            if not files:
                raise FileNotFoundError(f"split folder {str(folder)!r} holds no image files "
                                        f"({', '.join(IMAGE_SUFFIXES)}) in class folders")
            out[split] = [(str(path.relative_to(folder)), {"image": path, "label": c})
                          for path, c in files]
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=classes)})
        return features, out

    return store(name, data_dir, make, version=version)


def _mask_array(path: pathlib.Path, image_path: pathlib.Path) -> np.ndarray:
    """A mask file's class ids: palette PNGs (VOC style) give their indices, not colours."""
    from PIL import Image
    with Image.open(path) as mask, Image.open(image_path) as image:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"mask {str(path)!r} is {mask.mode}: a mask holds one class id "
                             f"per pixel (a grayscale or palette PNG)")
        if mask.size != image.size:
            raise ValueError(f"mask {str(path)!r} is {mask.size[0]}x{mask.size[1]} but its "
                             f"image {str(image_path)!r} is {image.size[0]}x{image.size[1]}")
        values = np.asarray(mask)
    if values.max(initial=0) > 255:
        raise ValueError(f"mask {str(path)!r} has class ids above 255")
    return values.astype(np.uint8)[..., None]


def store_segmentation_folder(root: str | pathlib.Path, name: str, data_dir: str, *,
                              splits: dict[str, str] | None = None, images: str = "images",
                              masks: str = "masks",
                              version: str = "1.0.0") -> tfds.core.DatasetBuilder:
    """Store a segmentation folder, `root/<split>/images/<stem>.<jpg|png>` with
    `root/<split>/masks/<stem>.png`, as the TFDS dataset `name` in `data_dir`, once.

    Mask pixels are class ids, 255 ignored (void); palette PNGs (VOC style) give their
    palette indices. Images are stored as they are; masks as exact one-channel PNGs under
    the feature "segmentation_mask". Read with
    `segmentation_pipeline(name, data_dir=data_dir,
    spec=DatasetSpec(segmentation_key="segmentation_mask", segmentation_classes=...))`.

    Args:
        root: The folder.
        name: The dataset's name.
        data_dir: The TFDS data directory to write to.
        splits: {TFDS split name: folder under root}; default: every folder of root.
        images: The image folder's name in each split folder.
        masks: The mask folder's name in each split folder.
        version: The dataset version.

    Returns:
        The prepared `tfds.core.DatasetBuilder`.

    Raises:
        FileNotFoundError: A split, image or mask folder is missing, or an image has no
            mask or a mask no image (every one is named).
        ValueError: A mask is not one channel, not its image's size, or above 255; or
            `name` is a TFDS builder's (it would read back as that dataset).
    """
    def make():
        out = {}
        for split, folder in _split_folders(root, splits).items():
            for sub in (images, masks):
                if not (folder / sub).is_dir():
                    raise FileNotFoundError(f"no folder {str(folder / sub)!r}")
            image_files = {p.stem: p for p in _images_in(folder / images)}
            mask_files = {p.stem: p for p in _images_in(folder / masks)}
            unmatched = sorted(set(image_files) ^ set(mask_files))
            if unmatched or not image_files:
                more = " ..." if len(unmatched) > 10 else ""
                raise FileNotFoundError(
                    f"{str(folder)!r}: every image needs a mask of the same name, and the "
                    f"split at least one; unmatched: {unmatched[:10]}{more}")
            out[split] = [(stem, {"image": image_files[stem],
                                  "segmentation_mask": _mask_array(mask_files[stem],
                                                                   image_files[stem])})
                          for stem in sorted(image_files)]
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "segmentation_mask": tfds.features.Image(shape=(None, None, 1))})
        return features, out

    return store(name, data_dir, make, version=version)
