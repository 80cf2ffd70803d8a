"""The benchmarked workloads: a flaxbones model and the PyTorch model it is measured against."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Workload:
    """`model` is a flaxbones `create_model` name; `reference` is 'torchvision:NAME',
    'timm:NAME' or 'deeplabv3plus:BACKBONE' (benchmarks/torch_models.py). Batch sizes are
    per platform: the 2-core CPU runs smaller batches than a GPU."""

    name: str
    model: str
    reference: str
    size: int
    task: str
    batch: dict
    num_classes: int = 1000

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
    _segmenter("deeplabv3plus_resnet101", "deeplabv3plus:resnet101"),
    _segmenter("deeplabv3plus_xception65", "deeplabv3plus:xception65"),
    # experiments/configs/cifar10_resnet18.py: small images, so layer4 runs at 2x2
    Workload("cifar_resnet18", "resnet18", "torchvision:resnet18", 64, "classification",
             {"cpu": 128, "gpu": 512}, 10),
    # a seconds-long workload for smoke tests of the scripts themselves
    Workload("smoke", "resnet18", "torchvision:resnet18", 64, "classification",
             {"cpu": 2, "gpu": 2}, 10),
)}
