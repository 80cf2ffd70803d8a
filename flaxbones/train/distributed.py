"""Multi-host start-up: the same program on every host, JAX's multi-controller runtime."""
import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str | None = "gloo",
               **kwargs) -> None:
    """`jax.distributed.initialize`, with CPU collectives (gloo) enabled first so that
    multi-process CPU runs (tests, debugging) work. With no arguments JAX detects the
    cluster (TPU pods, SLURM, ...). Call before anything else touches devices."""
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def is_main_process() -> bool:
    """True on process 0 (the one that logs and writes summaries)."""
    return jax.process_index() == 0
