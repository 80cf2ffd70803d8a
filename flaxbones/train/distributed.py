"""Multi-host start-up: the same program on every host, JAX's multi-controller runtime."""
from typing import Any

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str | None = "gloo",
               **kwargs: Any) -> None:
    """`jax.distributed.initialize`, with CPU collectives (gloo) enabled first.

    The collectives make multi-process CPU runs (tests, debugging) work. With no
    arguments JAX detects the cluster (TPU pods, SLURM, ...). Call it before anything else
    touches devices.

    Args:
        coordinator_address: "host:port" of process 0's coordinator; None: detected.
        num_processes: The number of processes; None: detected.
        process_id: This process's index; None: detected.
        cpu_collectives: The CPU collectives implementation ('gloo', 'mpi'), or None to
            leave JAX's setting.
        **kwargs: Further `jax.distributed.initialize` arguments.

    Raises:
        RuntimeError: From JAX, when called twice or after devices were initialised.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def is_main_process() -> bool:
    """Whether this is process 0 (the one that logs and writes summaries).

    Returns:
        True on process 0.
    """
    return jax.process_index() == 0
