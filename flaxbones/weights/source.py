"""Weight sources as data: how a checkpoint's keys map onto flaxbones, and what it expects."""
import dataclasses

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
INTERPOLATIONS = ("bilinear", "bicubic")
CROP_MODES = ("center", "squash")


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A family of checkpoints (torchvision, timm, ...) and the key map onto flaxbones.

    `rules` are (regex, template) pairs over a torch *module* path ('layer1.0.conv1');
    the first that matches the whole path gives the flax module path
    ('backbone/layer1_0/conv1'). Leaf names and layouts follow from the target module
    (kernel/scale/bias/mean/var). `mean`/`std` are the input normalisation the weights
    expect, for the data pipeline; the model itself never normalises. A detector's
    `transform` holds the rest of its input transform as (key, value) pairs (torchvision's
    `min_size`, `max_size`, `size_divisible`, SSD's `fixed_size`), read by
    `flaxbones.detection.preprocess`.

    The evaluation transform of the reference's default weights (`flaxbones.preprocess`):
    a classifier's shorter side is resized to `resize_size` (None: input_size / 0.875) with
    antialiased `interpolation`, then centre-cropped to `input_size` (`crop_mode="squash"`,
    timm's: both sides resized to `resize_size`, then the crop); a segmenter's shorter side
    is resized to `resize_size` (None: input_size), uncropped. `labels` names the class list
    of the weights shipped with flaxbones, or is the names themselves (`flaxbones.class_names`;
    None: ImageNet-1k for 1000 classes, torchvision's COCO list for 91, VOC for 21).
    """

    name: str
    rules: tuple[tuple[str, str], ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224
    num_classes: int = 1000
    head_prefix: str | tuple[str, ...] = ("head/", "aux_head/")  # what `skip_head` may skip
    transform: tuple[tuple[str, object], ...] = ()  # a detector's input transform (min_size, ...)
    resize_size: int | None = None
    interpolation: str = "bilinear"
    crop_mode: str = "center"
    labels: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, "
                             f"got {self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")

    def head_prefixes(self) -> tuple[str, ...]:
        prefixes = self.head_prefix
        return (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)

    def with_rules(self, rules) -> "WeightSource":
        """This source with more key rules (a classifier's head keys, say) appended."""
        return dataclasses.replace(self, rules=tuple(self.rules) + tuple(rules))

    def replace(self, **changes) -> "WeightSource":
        """This source with some fields changed (one variant's eval transform, say)."""
        return dataclasses.replace(self, **changes)


def timm_eval(input_size: int, crop_pct: float, interpolation: str = "bicubic",
              crop_mode: str = "center") -> dict:
    """A timm pretrained_cfg's eval transform as WeightSource fields: timm resizes to
    floor(input_size / crop_pct) before the crop."""
    return dict(input_size=input_size, resize_size=int(input_size / crop_pct),
                interpolation=interpolation, crop_mode=crop_mode)
