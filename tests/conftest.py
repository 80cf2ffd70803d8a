"""Test-session settings: repo root importable, quiet TF, one XLA compilation cache that
subprocesses share (identical programs compile once per session)."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"flaxbones-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite is compile-bound on small shapes: LLVM's expensive passes cost more than they save.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")


import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _remove_module_temp_dirs(tmp_path_factory):
    """Delete the temporary directories a test module made once it ends: the suite writes
    ~13 GB of weight files and checkpoints, more than a CI machine's disk may have free."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for path in set(base.iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)


# --- scheduling over the xdist workers (`--dist loadscope --no-loadscope-reorder`) -------
# A test module is one unit of work (its module fixtures compile once), but for the two
# modules whose tests compile independent programs: experiments' configs and remat's
# models split into a unit each. Units run largest first (seconds of a cold full run's
# --durations on a 2-core machine), so neither worker is left with a long module at the end.
# The units reach xdist through its scheduler hook, computed from the test ids: xdist's own
# `xdist_group` marks stop grouping on pytest 9 (pytest-dev/pytest-xdist#1386), and then
# every test runs on either worker, each setting up the module fixtures again.
_UNIT_SECONDS = {
    "test_experiments.py": 295, "test_detection_rcnn.py": 250,
    "test_detection_rcnn_train.py": 155, "test_detection_train_engine.py": 85,
    "test_checkpoint.py": 75, "test_convnext.py": 80, "test_train_parallel.py": 80,
    "test_benchmarks.py": 55, "test_detection_onestage_train.py": 80,
    "test_detection_train_parallel.py": 50, "test_save_weights.py": 45,
    "config:finetune_maskrcnn_from_coco": 96, "config:coco_maskrcnn_resnet50_fpn": 80,
    "config:cityscapes_deeplabv3plus_xception65": 70,
    "config:coco_fasterrcnn_mobilenet_v3_large_fpn": 60, "config:demo": 50,
    "config:shapes_classifier": 50, "config:shapes_maskrcnn": 50,
    "config:coco_retinanet_resnet50_fpn": 40, "config:pet_deeplabv3plus_resnet50": 40,
    "config:imagenet_resnet50": 34, "config:cifar10_resnet18": 16,
    "remat:googlenet": 52, "remat:demo": 41, "remat:mobilenet_v3_small": 37,
    "remat:mobilenet_v2_050": 31, "remat:xception": 27, "remat:vgg11_bn": 24,
    "remat:xception65_scan": 22,
    "docs:README.md": 130, "docs:docs/guides/your-data.md": 25,
    "docs:docs/guides/checkpoints.md": 25, "docs:docs/guides/finetuning.md": 20,
    "docs:docs/models.md": 15, "docs:docs/training.md": 14,
}
_CONFIG_UNIT = {"transfer_shapes_from_classifier": "shapes_classifier"}
# test_docs runs each page's code blocks as a unit of its own.
# test_remat's tests of one model share its compiled steps: a unit per model.
_REMAT_PER_MODEL = {"test_remat_gives_the_same_outputs_gradients_and_statistics",
                    "test_remat_drops_activations", "test_remat_recomputes_every_block_of"}


def _work_unit(nodeid: str) -> str:
    """The unit of work of a test id ('tests/test_x.py::test_f[param]')."""
    path, _, test = nodeid.partition("::")
    module = path.rsplit("/", 1)[-1]
    function, _, param = test.rsplit("::", 1)[-1].partition("[")
    param = param[:param.rfind("]")]
    if module == "test_experiments.py":
        if function == "test_config_trains_and_evaluates" and param != "tiny":
            return f"config:{_CONFIG_UNIT.get(param, param)}"  # tiny: the module's `trained`
        if "classifier_top5" in function:
            return "config:shapes_classifier"
        if "predict_detector" in function:
            return "config:shapes_maskrcnn"
    if module == "test_remat.py" and function in _REMAT_PER_MODEL:
        return f"remat:{param}"
    if module == "test_docs.py" and function == "test_page_code_runs":
        return f"docs:{param}"
    return module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduling with this suite's units of work as the scopes."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _work_unit(nodeid)

    return WorkUnitScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    units = {}
    for item in items:
        units.setdefault(_work_unit(item.nodeid), []).append(item)
    order = sorted(units, key=lambda u: -_UNIT_SECONDS.get(u, 0))  # stable: the rest as found
    items[:] = [item for unit in order for item in units[unit]]
