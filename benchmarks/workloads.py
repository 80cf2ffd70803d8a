"""The benchmarked workloads: a flaxbones model and the PyTorch model it is measured against."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Workload:
    """`model` is a flaxbones `create_model` name, built with `model_kwargs`; `reference` is
    'torchvision:NAME', 'timm:NAME' or 'deeplabv3plus:BACKBONE' (benchmarks/torch_models.py),
    or None where no PyTorch model matches (benchmarks.memory only). Batch sizes are per
    platform: the 2-core CPU runs smaller batches than a GPU."""

    name: str
    model: str
    reference: str | None
    size: int
    task: str
    batch: dict
    num_classes: int = 1000
    model_kwargs: dict = dataclasses.field(default_factory=dict)

    def batch_for(self, platform: str) -> int:
        return self.batch["gpu" if platform == "gpu" else "cpu"]


def _classifier(name, reference):
    return Workload(name, name, reference, 224, "classification", {"cpu": 16, "gpu": 128})


def _segmenter(name, reference):
    return Workload(name, name, reference, 512, "segmentation", {"cpu": 2, "gpu": 16}, 21)


WORKLOADS = {w.name: w for w in (
    _classifier("resnet50", "torchvision:resnet50"),
    _classifier("resnet101", "torchvision:resnet101"),
    _classifier("xception65", "timm:xception65"),
    _classifier("mobilenet_v2", "torchvision:mobilenet_v2"),
    _classifier("convnext_tiny", "torchvision:convnext_tiny"),
    _classifier("vit_b_16", "torchvision:vit_b_16"),
    _segmenter("deeplabv3plus_resnet101", "deeplabv3plus:resnet101"),
    _segmenter("deeplabv3plus_xception65", "deeplabv3plus:xception65"),
    # experiments/configs/cifar10_resnet18.py: small images, so layer4 runs at 2x2
    Workload("cifar_resnet18", "resnet18", "torchvision:resnet18", 64, "classification",
             {"cpu": 128, "gpu": 512}, 10),
    # experiments/configs/demo.py: TF-style DeepLabv3+ on MobileNetV2 (its 1280-channel C5),
    # which neither torch_models reference builds
    Workload("demo", "deeplabv3plus", None, 64, "segmentation", {"cpu": 16, "gpu": 16}, 4,
             {"backbone": "mobilenet_v2", "output_stride": 16, "style": "tf",
              "head_kwargs": {"bn_momentum": 0.9}}),
    # a seconds-long workload for smoke tests of the scripts themselves
    Workload("smoke", "resnet18", "torchvision:resnet18", 64, "classification",
             {"cpu": 2, "gpu": 2}, 10),
)}
