"""Packaging: one version, the license, the dependency split, and a core without TensorFlow.

The core (models, weights, the training engine, Orbax checkpoints) installs with
`pip install flaxbones` and must work where TensorFlow is absent; only `flaxbones.data`
(the `[data]` extra) and experiments/ (`[experiments]`) may import it.
"""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

import flaxbones

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "flaxbones")

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)

# Import name -> distribution, for every third-party module the package imports.
CORE_IMPORTS = {"jax": "jax", "flax": "flax", "optax": "optax", "orbax": "orbax-checkpoint",
                "numpy": "numpy", "safetensors": "safetensors"}
DATA_IMPORTS = {"tensorflow": "tensorflow-cpu", "tensorflow_datasets": "tensorflow-datasets",
                "etils": "etils", "pycocotools": "pycocotools", "PIL": "pillow"}
EXPERIMENTS_IMPORTS = {"ml_collections": "ml-collections", "absl": "absl-py",
                       "matplotlib": "matplotlib", "PIL": "pillow", "tqdm": "tqdm"}
# The core may import these inside a function only, for one optional feature: torch reads
# .pth weight files and torchvision / timm build the reference models that
# `save_weights(layout="torch")` fills (the [torch] extra), pycocotools evaluates COCO AP (the
# [data] extra), Pillow reads and resizes image files for `fb.preprocess` (the [experiments] extra).
LAZY_OPTIONAL = {"torch", "torchvision", "timm", "pycocotools", "PIL"}
# flaxbones.data loads triton (when installed) before TensorFlow: see its __init__.
DATA_OPTIONAL = {"triton"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports(path):
    """(top-level module name, imported inside a function?) for each import in `path`."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((child.module.split(".")[0], in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _third_party_imports(subpackage_filter, top=PACKAGE):
    out = {}
    for dirpath, _, files in os.walk(top):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, top)
            if not f.endswith(".py") or not subpackage_filter(rel):
                continue
            for module, lazy in _imports(path):
                if module in sys.stdlib_module_names or module == "flaxbones":
                    continue
                out.setdefault(module, []).append((rel, lazy))
    return out


def test_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "flaxbones._version.__version__"
    from flaxbones import _version
    assert flaxbones.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", flaxbones.__version__)


def test_installed_distribution_has_the_package_version():
    try:
        installed = importlib.metadata.version("flaxbones")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flaxbones is not installed (run from a checkout); `pip install -e .`")
    assert installed == flaxbones.__version__, (
        f"installed distribution {installed} != flaxbones.__version__ {flaxbones.__version__}: "
        "reinstall (`pip install -e .`)")


def test_license():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    requires = PYPROJECT["build-system"]["requires"]
    floor = [r for r in requires if _name(r) == "setuptools"][0]
    assert int(re.search(r">=\s*(\d+)", floor).group(1)) >= 77  # PEP 639 metadata
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "flaxbones authors" in text


def test_core_dependencies_are_what_the_core_imports():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert declared == set(CORE_IMPORTS.values())
    for heavy in ("tensorflow", "tensorflow-cpu", "tensorflow-datasets", "torch", "matplotlib",
                  "ml-collections", "tensorboard"):
        assert heavy not in declared
    imports = _third_party_imports(lambda rel: not rel.startswith("data" + os.sep))
    for module, where in imports.items():
        if module in CORE_IMPORTS:
            continue
        eager = [rel for rel, lazy in where if not lazy]
        assert module in LAZY_OPTIONAL and not eager, (
            f"the core imports {module!r} ({where}); declare it in pyproject's dependencies, "
            "or keep it in flaxbones.data / an extra")


def test_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    data = {_name(r) for r in extras["data"]}
    assert {"tensorflow-datasets", "etils"} <= data and data & {"tensorflow", "tensorflow-cpu"}
    imports = _third_party_imports(lambda rel: rel.startswith("data" + os.sep))
    for module, where in imports.items():
        assert module in {**CORE_IMPORTS, **DATA_IMPORTS}.keys() | DATA_OPTIONAL, (
            f"flaxbones.data imports {module!r} ({where}); declare it in the [data] extra")
    assert "flaxbones[data]" in extras["experiments"]
    assert set(EXPERIMENTS_IMPORTS.values()) <= {_name(r) for r in extras["experiments"]}
    experiments = os.path.join(ROOT, "experiments")
    local = {f[:-3] for _, _, fs in os.walk(experiments) for f in fs if f.endswith(".py")}
    for module, where in _third_party_imports(lambda rel: True, experiments).items():
        assert module in {**CORE_IMPORTS, **DATA_IMPORTS, **EXPERIMENTS_IMPORTS}.keys() | local, (
            f"experiments/ imports {module!r} ({where}); declare it in the [experiments] extra")
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(extras["torch"])
    test = " ".join(extras["test"])
    assert "pytest" in test and all(e in test for e in ("data", "experiments", "torch"))


CORE_WITHOUT_TF = textwrap.dedent("""
    import importlib.abc
    import sys

    BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorboard", "keras", "torch",
               "torchvision", "timm")
    attempts = []

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)",
                                          name=name)
            return None

    sys.meta_path.insert(0, Refuse())

    import jax
    import numpy as np

    import flaxbones as fb
    import flaxbones.backbones, flaxbones.heads, flaxbones.models, flaxbones.layers
    import flaxbones.weights, flaxbones.train, flaxbones.train.checkpoint
    from flaxbones import train

    def finite(tree):
        return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))

    rng = jax.random.PRNGKey(0)
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)

    def init_apply(model):  # one compilation for both (eager init dispatches op by op)
        return jax.jit(lambda x: model.apply(model.init(rng, x, train=False), x, train=False))(x)

    bb = fb.create_backbone("resnet18")
    feats = init_apply(bb)
    assert set(feats) == {f.name for f in bb.feature_info} and finite(feats), feats.keys()
    for model in (fb.create_model("mobilenet_v2_050", num_classes=3),
                  fb.create_model("deeplabv3plus", backbone="mobilenet_v2_050", num_classes=3)):
        out = init_apply(model)
        assert finite(out) and any(np.shape(o)[-1] == 3 for o in jax.tree.leaves(out))

    model = fb.create_model("resnet18", num_classes=3)  # the cheapest train step to compile
    mesh = train.make_mesh()
    state = train.create_train_state(model, train.make_optimizer("sgd", 0.1, momentum=0.9),
                                     rng, (1, 32, 32, 3), mesh)
    step = train.make_train_step(train.Classification(), mesh,
                                 jax.tree.map(lambda a: a.sharding, state))
    batch = {"image": x, "label": np.array([0, 2], np.int32), "valid": np.ones(2, bool)}
    state, sums = step(state, train.shard_batch(batch, mesh))
    metrics = train.summarize(jax.device_get(sums))
    assert np.isfinite(metrics["loss"]), metrics
    assert int(jax.device_get(state.step)) == 1

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    assert "tensorflow" not in sys.modules and "flaxbones.data" not in sys.modules
    print("attempted:", sorted(set(attempts)))
    print("OK")
""")


def test_core_works_without_tensorflow():
    """Models, weights, a jitted train step and the checkpoint module, with TensorFlow (and
    torch) made unimportable: what a `pip install flaxbones` without extras gets."""
    # One CPU device; XLA's cheapest backend optimisation: this checks that it runs, not speed.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    result = subprocess.run([sys.executable, "-c", CORE_WITHOUT_TF], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, (
        "the core needs something it must not (import chain below):\n"
        + result.stdout[-2000:] + result.stderr[-6000:])
