"""experiments/ scripts run inside the test process, at test size: what test_experiments'
config tests and the docs' shell blocks (docs_blocks) share."""
import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
CONFIGS = os.path.join(EXPERIMENTS, "configs")
if CONFIGS not in sys.path:
    sys.path.insert(0, CONFIGS)  # configs import `common`

# torchvision's per-image counts (2000 proposals, 512 RoIs of which 128 reach the mask head)
# sized for 64 px test images, where those defaults would make a step take a minute on CPU.
# A test may add them when the config does not set them (they are sizes, not recipe).
RCNN_TEST_SIZES = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
                       rpn_pre_nms_top_n=150, rpn_post_nms_top_n=100,
                       box_batch_size_per_image=64, detections_per_img=20)

# The configs' large models compile in a third less time with lax's convolutions than with
# the CPU rewrites (tested on their own in test_layers): the config tests run them so, but
# for the demo's and the tiny configs, which keep the default a CPU user gets.
TEST_MODEL_KWARGS = dict(cpu_kernels=False)
CPU_KERNEL_CONFIGS = ("demo", "tiny")


@functools.cache
def load_module(name):
    """experiments/`name`.py as a module, executed once per process: train.py and
    predict.py define absl flags, which a second execution would define again."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name, **overrides):
    config = importlib.import_module(name).get_config()
    config.update(overrides)
    return config


def shrink(config, name):
    """Config `name` (a loaded config, command-line overrides included) at test size, in
    place: batch 2, two train steps, one evaluation, the built-in dataset's tiny builds.
    Segmenters train on 32 px crops and evaluate on canvases of the config's aspect,
    classifiers see 64 px: at output stride 16 (32) that leaves BatchNorm 2x2 maps, the
    smallest that train: at 1x1 a batch of 2 normalises 2 values per channel and the
    gradients overflow. Detection runs on the 64 px instances build."""
    config.update(batch_size=2, num_steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                  num_pictures=2)
    if name not in CPU_KERNEL_CONFIGS:
        config.model_kwargs.update(TEST_MODEL_KWARGS)
    if config.task == "detection":
        config.detection.update(min_size=64, max_size=64, pad_size=64, label_offset=1,
                                label_map="")
        if "rcnn" in config.model:  # proposal and RoI counts for 64 px images
            config.model_kwargs.update({k: v for k, v in RCNN_TEST_SIZES.items()
                                        if k not in config.model_kwargs})
        config.dataset = "flaxbones_shapes/instances_tiny"
        return config
    h, w = importlib.import_module("common").pair(config.eval_size)
    config.update(image_size=64, crop_size=32, eval_size=(32, round(32 * w / h)))
    if config.dataset.startswith("flaxbones_shapes"):
        config.dataset = "flaxbones_shapes/tiny"
    return config


def at_test_size(name, data_dir):
    """Config `name` as its file has it, at test size (shrink), reading `data_dir`."""
    return shrink(load_config(name, data_dir=data_dir), name)


def _prepared(config) -> bool:
    import flaxbones.data as fbd
    try:
        fbd.load_builder(config.dataset, config.data_dir or None)  # raises unless prepared
    except (fbd.DatasetNotPreparedError, ValueError):  # not stored there, or no such name
        return False
    return True


@contextlib.contextmanager
def dataset_of(config):
    """The built-in dataset and any dataset prepared in config.data_dir as they are; any
    other as TFDS mock data (2 examples a split), its builder reporting itself prepared.
    Oxford pets' trimaps need values 1..3."""
    if config.dataset.startswith("flaxbones_shapes") or _prepared(config):
        yield
        return
    import tensorflow_datasets as tfds
    options = {"oxford_iiit_pet": dict(max_value=4)}.get(config.dataset, {})
    with mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True), \
            tfds.testing.mock_data(num_examples=2, **options):
        yield


@contextlib.contextmanager
def _absl_flags(argv):
    """The process's absl flags parsed from `argv` as a fresh process would (defaults for
    every flag not given; ml_collections reads `--config.x` overrides from sys.argv), the
    logging verbosity put back afterwards."""
    from absl import flags, logging

    def reset():  # the `--config.x` flags are defined by the parse that meets them
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)

    verbosity = logging.get_verbosity()
    reset()
    try:
        with mock.patch.object(sys, "argv", list(argv)):
            yield flags.FLAGS(argv)
    finally:
        reset()
        logging.set_verbosity(verbosity)


def run_train(args, data_dir):
    """`python experiments/train.py *args` in this process, its config at test size
    (shrink); `data_dir` unless the command names one."""
    train = load_module("train")
    original = train.train_and_evaluate

    def at_size(config, workdir):
        from absl import flags
        from ml_collections import config_flags
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        with config.unlocked():  # the flag's config takes no new keys, test sizes add some
            shrink(config, os.path.splitext(os.path.basename(path))[0])
            config.data_dir = config.data_dir or str(data_dir)
        with dataset_of(config):
            return original(config, workdir)

    with _absl_flags(["train.py", *args]) as rest, \
            mock.patch.object(train, "train_and_evaluate", at_size):
        train.main(rest)


def run_predict(args):
    """`python experiments/predict.py *args` in this process, as it is."""
    predict = load_module("predict")
    with _absl_flags(["predict.py", *args]) as rest:
        predict.main(rest)


def run_show_backbones(args):
    """`python experiments/show_backbones.py *args` for the ResNet-18s alone: the whole
    registry is test_registry's."""
    show = load_module("show_backbones")
    with mock.patch.object(sys, "argv", ["show_backbones.py", *args, "--pattern", "resnet18*"]):
        show.main()
