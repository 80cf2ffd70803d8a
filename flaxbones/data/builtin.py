"""`flaxbones_shapes`: a TFDS dataset the library generates itself, offline, in seconds.

Each image shows 1-3 non-overlapping shapes (circle, square, triangle; random size,
position and colour; upright, or at random angles in the 'rotated' config) on a
textured background (colour, two sinusoidal gratings, noise). Per-pixel classes:
0 background, 1 circle, 2 square, 3 triangle. Features: 'image' (H, W, 3) uint8,
'segmentation_mask' (H, W, 1) uint8 of those classes, 'label' the shape class covering
most pixels, 'labels' every shape class present. Example i of a split is drawn from
numpy's generator seeded by (config seed, split, i), so every build is identical.
Shapes keep a colour contrast with the background and span 26-59% of the image side,
so the task is learnable in minutes on CPU.

The 'instances' configs (/instances 96 px, /instances_tiny 64 px for tests) place 1-5
shapes independently, so they overlap (a later shape occludes), and add the raw detection
features: 'image/id' int64 and 'objects' {'bbox' (n, 4) normalised (ymin, xmin, ymax,
xmax) of each visible mask's extent, 'label' (n,) 0-based INSTANCE_CLASSES, 'mask'
(n, H, W) uint8 visible pixels, 'is_crowd' (n,) False}; a shape with little left
visible is not annotated. A detector on it has len(CLASSES) = 4 classes (0 background).

    import flaxbones.data  # registers the builder
    tfds.builder("flaxbones_shapes", data_dir=d).download_and_prepare()   # or /tiny, /instances
"""
import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

CLASSES = ("background", "circle", "square", "triangle")
"""The per-pixel classes of `segmentation_mask`, index = class id."""
INSTANCE_CLASSES = CLASSES[1:]  # objects/label: 0-based; a detector adds background at 0
"""The classes of 'objects/label' in the instances configs, 0-based (a detector adds
background at 0)."""
_SPLITS = ("train", "test")


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side, examples per split, shapes per image and the generator seed."""

    image_size: int = 96
    num_train: int = 1000
    num_test: int = 200
    max_shapes: int = 3
    rotate: bool = False
    seed: int = 0
    instances: bool = False


def _shape_mask(kind, yy, xx, cy, cx, r, angle):
    """Boolean mask of one shape of size r (circle radius) centred at (cy, cx)."""
    y, x = yy - cy, xx - cx
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    if kind == 1:
        return u * u + v * v <= r * r
    if kind == 2:
        half = 0.8 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):  # equilateral triangle: three half-planes at inradius 0.7 r
        a = angle + 2 * np.pi * k / 3
        inside &= (x * np.cos(a) + y * np.sin(a)) <= 0.7 * r
    return inside


def _background(rng, size, yy, xx):
    """(background colour, float32 image): a flat colour plus two sinusoidal gratings."""
    bg = rng.uniform(40, 215, 3)
    image = np.broadcast_to(bg.astype(np.float32), (size, size, 3)).copy()
    for _ in range(2):
        freq, theta, phase = rng.uniform(0.1, 0.5), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        image += wave[..., None] * (rng.uniform(8, 20) * rng.uniform(-1, 1, 3)).astype(np.float32)
    return bg, image


def _colour(rng, bg):
    """A shape colour at least 100 away from the background colour."""
    colour = rng.uniform(0, 255, 3)
    while np.linalg.norm(colour - bg) < 100:
        colour = rng.uniform(0, 255, 3)
    return colour


def _paint(rng, image, inside, colour):
    image[inside] = colour + rng.normal(0, 6, (int(inside.sum()), 3))


def _finish(rng, image):
    image += 6 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render(rng: np.random.Generator, size: int, max_shapes: int = 3, rotate: bool = False):
    """One example: (image uint8 (size, size, 3), mask uint8 (size, size)).

    Without `rotate`, squares are axis-aligned and triangles upright: about 1.5x fewer
    training steps to the same mIoU in a small DeepLab-like probe.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg, image = _background(rng, size, yy, xx)
    mask = np.zeros((size, size), np.uint8)
    placed = []
    for _ in range(rng.integers(1, max_shapes + 1)):
        for _try in range(20):
            r = rng.uniform(0.13, 0.21) * size
            reach = 1.4 * r  # circumradius of the triangle, the widest shape
            cy, cx = rng.uniform(reach, size - reach, 2)
            if all(np.hypot(cy - py, cx - px) > reach + pr + 2 for py, px, pr in placed):
                break
        else:
            continue
        placed.append((cy, cx, reach))
        kind = int(rng.integers(1, len(CLASSES)))
        colour = _colour(rng, bg)
        angle = rng.uniform(0, 2 * np.pi) if rotate else (np.pi / 2 if kind == 3 else 0.0)
        inside = _shape_mask(kind, yy, xx, cy, cx, r, angle)
        _paint(rng, image, inside, colour)
        mask[inside] = kind
    return _finish(rng, image), mask


def render_instances(rng: np.random.Generator, size: int, max_shapes: int = 5,
                     rotate: bool = False, min_visible: float = 0.2):
    """One instance-segmentation example: (image uint8 (size, size, 3), masks uint8
    (n, size, size) of the visible pixels, labels int64 (n,) 0-based shape classes).

    1-`max_shapes` shapes at independent positions, so they may overlap; a later shape
    occludes the earlier ones. A shape left with fewer visible pixels than `min_visible`
    of its own area (or 16) is not annotated.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg, image = _background(rng, size, yy, xx)
    owner = np.full((size, size), -1, np.int32)
    kinds, areas = [], []
    for k in range(rng.integers(1, max_shapes + 1)):
        r = rng.uniform(0.10, 0.19) * size
        reach = 1.4 * r
        cy, cx = rng.uniform(reach, size - reach, 2)
        kind = int(rng.integers(1, len(CLASSES)))
        colour = _colour(rng, bg)
        angle = rng.uniform(0, 2 * np.pi) if rotate else (np.pi / 2 if kind == 3 else 0.0)
        inside = _shape_mask(kind, yy, xx, cy, cx, r, angle)
        _paint(rng, image, inside, colour)
        owner[inside] = k
        kinds.append(kind)
        areas.append(int(inside.sum()))
    masks = owner[None] == np.arange(len(kinds))[:, None, None]
    keep = masks.sum((1, 2)) >= np.maximum(min_visible * np.asarray(areas), 16)
    labels = np.asarray(kinds, np.int64)[keep] - 1
    return _finish(rng, image), masks[keep].astype(np.uint8), labels


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Normalised (ymin, xmin, ymax, xmax) float32 of each (n, h, w) mask's pixel extent."""
    h, w = masks.shape[1:]
    rows, cols = masks.any(2), masks.any(1)
    box = [rows.argmax(1), cols.argmax(1), h - rows[:, ::-1].argmax(1),
           w - cols[:, ::-1].argmax(1)]
    return (np.stack(box, 1) / np.array([h, w, h, w])).astype(np.float32).reshape(-1, 4)


class FlaxbonesShapes(tfds.core.GeneratorBasedBuilder):
    """Shapes on textured backgrounds, with per-pixel classes and image-level labels."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict] = {"1.0.0": "Shapes at random angles.",
                     "1.1.0": "Upright shapes by default; the 'rotated' config keeps random angles."}
    BUILDER_CONFIGS: ClassVar[list] = [
        ShapesConfig(name="default", description="96x96, 1000 train / 200 test"),
        ShapesConfig(name="small", description="64x64, 1000 train / 200 test", image_size=64),
        ShapesConfig(name="rotated", description="96x96, shapes at random angles", rotate=True),
        ShapesConfig(name="tiny", description="32x32, 24 train / 10 test (tests)",
                     image_size=32, num_train=24, num_test=10, max_shapes=2),
        ShapesConfig(name="instances", description="96x96, 1000 train / 200 test, up to 5 "
                     "overlapping shape instances with boxes and masks", max_shapes=5,
                     instances=True),
        ShapesConfig(name="instances_tiny", description="64x64 instances, 16 train / 8 test "
                     "(tests)", image_size=64, num_train=16, num_test=8, max_shapes=5,
                     instances=True),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup imports `importlib_resources`, which it does not require on
        # Python >= 3.9; this file is the answer it would compute.
        return epath.Path(__file__)

    def _info(self):
        s = self.builder_config.image_size
        features = {
            "image": tfds.features.Image(shape=(s, s, 3)),
            "segmentation_mask": tfds.features.Image(shape=(s, s, 1)),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=CLASSES)),
        }
        if self.builder_config.instances:
            features["image/id"] = np.int64
            features["objects"] = tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=INSTANCE_CLASSES),
                "mask": tfds.features.Tensor(shape=(s, s), dtype=np.uint8,
                                             encoding=tfds.features.Encoding.ZLIB),
                "is_crowd": np.bool_,
            })
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            description=__doc__.split("\n\n")[0],
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        counts = {"train": c.num_train, "test": c.num_test}
        return {split: self._generate_examples(split, counts[split]) for split in _SPLITS}

    def _generate_examples(self, split, count):
        c = self.builder_config
        for i in range(count):
            rng = np.random.default_rng([c.seed, _SPLITS.index(split), i])
            if c.instances:
                image, masks, labels = render_instances(rng, c.image_size, c.max_shapes,
                                                        c.rotate)
                mask = np.max(masks * (labels + 1)[:, None, None], 0, initial=0).astype(np.uint8)
            else:
                image, mask = render(rng, c.image_size, c.max_shapes, c.rotate)
            area = np.bincount(mask.ravel(), minlength=len(CLASSES))
            example = {
                "image": image,
                "segmentation_mask": mask[..., None],
                "label": int(np.argmax(area[1:]) + 1),
                "labels": [k for k in range(1, len(CLASSES)) if area[k]],
            }
            if c.instances:
                example["image/id"] = i
                example["objects"] = {"bbox": mask_boxes(masks), "label": labels, "mask": masks,
                                      "is_crowd": np.zeros(len(labels), bool)}
            yield i, example
