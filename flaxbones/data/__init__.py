"""TFDS input pipelines: host-split, augmented, batched, delivered as global jax.Arrays.

    import flaxbones.data as fbd
    train = fbd.segmentation_pipeline("flaxbones_shapes", batch_size=32, train=True,
                                      model="resnet50", mesh=mesh)
    for step, batch in zip(range(n), train): ...
    for batch in fbd.segmentation_pipeline(..., train=False): ...   # one exact pass
    det = fbd.detection_pipeline("flaxbones_shapes/instances", batch_size=8, train=True,
                                 model="fasterrcnn_resnet50_fpn", min_size=96, max_size=160)

Every batch is a dict with a leading batch axis N (global with a mesh, else this host's):
    'image'         float32 (N, H, W, 3)  normalised with mean/std on the [0, 1] scale
    'label'         int32 (N,)            classification pipelines
    'segmentation'  int32 (N, H, W)       segmentation pipelines; 255 = ignore (padding, void)
    'boxes', ...    detection pipelines: padded ground truth (flaxbones.data.detection)
    'valid'         bool (N,)             False for the padding examples that fill the last
                                          eval batches; always True in training
Evaluation yields every example of the split exactly once over all hosts; weight
per-example metrics by 'valid' (and skip pixels labelled 255). With `mesh=` (any
jax.sharding.Mesh, e.g. `flaxbones.train.make_mesh(fsdp=2)`) the arrays are global
jax.Arrays with the train steps' batch sharding (split over every mesh axis), each host
feeding its `tfds.split_for_jax_process` part; without, numpy. A training stream is
endless and exactly resumable: `start_batch=n` continues after n batches, cheaply.

Datasets: the built-in `flaxbones_shapes` (generated locally on first use) and TFDS
datasets prepared in a `data_dir` (cifar10/100, imagenette, imagenet2012,
oxford_iiit_pet, cityscapes, ...), or folders of your own images stored once as such a
dataset (`store_image_folder`, `store_segmentation_folder`); nothing is downloaded here.
TensorFlow is only the input pipeline: importing this package hides GPUs from it, so it
never takes JAX's accelerator memory. Import it before anything else imports TensorFlow.
"""
import importlib.util

if importlib.util.find_spec("triton") is not None:
    # TF >= 2.20 loads its LLVM with RTLD_GLOBAL; triton (torch's compiler) imported after
    # it segfaults (tensorflow/tensorflow#124205), so load triton first when installed.
    import triton  # noqa: F401
import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices: the caller chose; keep it
    pass

from flaxbones.data import builtin  # registers flaxbones_shapes with TFDS
from flaxbones.data.classification import classification_pipeline
from flaxbones.data.detection import (
    COCO_CATEGORY_IDS,
    COCO_PERSON_KEYPOINT_FLIP,
    DetectionPipeline,
    detection_pipeline,
)
from flaxbones.data.folders import store_image_folder, store_segmentation_folder
from flaxbones.data.pipeline import Pipeline, normalization, to_global
from flaxbones.data.segmentation import segmentation_pipeline
from flaxbones.data.sources import (
    DATASETS,
    IGNORE_LABEL,
    DatasetNotPreparedError,
    DatasetSpec,
    host_split,
    load_builder,
)

__all__ = ["COCO_CATEGORY_IDS", "COCO_PERSON_KEYPOINT_FLIP", "DATASETS", "IGNORE_LABEL",
           "DatasetNotPreparedError", "DatasetSpec", "DetectionPipeline", "Pipeline", "builtin",
           "classification_pipeline", "detection_pipeline", "host_split", "load_builder",
           "normalization", "segmentation_pipeline", "store_image_folder",
           "store_segmentation_folder", "to_global"]
