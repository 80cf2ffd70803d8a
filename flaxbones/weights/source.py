"""Weight sources as data: how a checkpoint's keys map onto flaxbones, and what it expects."""
import dataclasses

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)


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
    """

    name: str
    rules: tuple[tuple[str, str], ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224
    num_classes: int = 1000
    head_prefix: str | tuple[str, ...] = ("head/", "aux_head/")  # what `skip_head` may skip
    transform: tuple[tuple[str, object], ...] = ()  # a detector's input transform (min_size, ...)

    def head_prefixes(self) -> tuple[str, ...]:
        prefixes = self.head_prefix
        return (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)

    def with_rules(self, rules) -> "WeightSource":
        """This source with more key rules (a classifier's head keys, say) appended."""
        return dataclasses.replace(self, rules=tuple(self.rules) + tuple(rules))
