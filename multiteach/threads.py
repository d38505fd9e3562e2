"""How many threads a process computes with, chosen from the CPUs it may really use.

torch's intra-op threads (OpenMP) split every op across threads and meet at a barrier after it. Two
things make that collapse on a machine shared with other work:

- **spin-waiting**: by default OpenMP threads spin at the barrier for a while before sleeping. When a
  sibling thread has been descheduled (another process holds its CPU), the spinning thread burns the time
  slice the sibling needs. ``multiteach/__init__`` therefore sets ``OMP_WAIT_POLICY=PASSIVE`` before torch
  loads its OpenMP runtime (unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is already set).
  ``benchmarks/shared_cpu.py`` measures the demo-sized step with and without a busy neighbour.
- **over-subscription**: more threads than usable CPUs (a container quota or a SLURM cpuset smaller than
  the machine, several processes per machine). :func:`choose_threads` starts from the CPUs this process
  may run on (``os.sched_getaffinity``, capped by a cgroup v2 CPU quota), divided by the processes the
  launcher started on this machine (``LOCAL_WORLD_SIZE``).

DataLoader workers compute with one thread (:func:`multiteach.data.loader.worker_init`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_quota(path: Path | None = None) -> float | None:
    """CPUs granted by a cgroup v2 quota (``docker --cpus=2`` gives 2.0), or None without a quota."""
    try:
        quota, period = (path or CGROUP_CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, SLURM and container cpusets), capped by a
    cgroup v2 CPU quota; at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def choose_threads(requested: int | None = None, local_processes: int | None = None) -> tuple[int, str]:
    """Intra-op threads for one training process, and where the number comes from.

    Args:
        requested: ``train.threads`` (wins when set).
        local_processes: Processes sharing this machine; default ``$LOCAL_WORLD_SIZE`` (set by torchrun
            and ``accelerate launch``) or 1.

    Returns:
        ``(threads, reason)``; an explicit ``OMP_NUM_THREADS`` is kept when ``requested`` is None.
    """
    if requested:
        return int(requested), "train.threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    procs = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cpus = usable_cpus()
    return max(1, cpus // max(1, procs)), f"{cpus} usable CPU(s) / {procs} process(es) on this machine"


__all__ = ["cgroup_cpu_quota", "choose_threads", "usable_cpus"]
