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
