"""Threads that fit the machine: intra-op threads from the usable CPUs, single-threaded DataLoader workers
that leave SIGINT/SIGTERM to the main process, and the ``train.threads`` override."""

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from multiteach import threads
from multiteach.config import load_recipe
from multiteach.data.loader import worker_init
from multiteach.errors import MultiteachError
from multiteach.train import train

from .engine_fixtures import recipe_yaml


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """An 8-CPU affinity mask, no OMP_NUM_THREADS, no launcher, and a cgroup cpu.max file to fill in."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", cpu_max)
    return cpu_max


def test_threads_come_from_the_usable_cpus_and_the_processes_on_the_machine(machine, monkeypatch):
    assert threads.choose_threads() == (8, "8 usable CPU(s) / 1 process(es) on this machine")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun / accelerate launch with 2 processes here
    assert threads.choose_threads()[0] == 4
    machine.write_text("150000 100000\n")  # docker --cpus=1.5 on an 8-CPU host: 2 CPUs' worth
    assert threads.usable_cpus() == 2 and threads.choose_threads()[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit environment wins over the guess ...
    assert threads.choose_threads() == (3, "OMP_NUM_THREADS")
    assert threads.choose_threads(5) == (5, "train.threads")  # ... and the recipe over both


class _WorkerState(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)]
        return torch.tensor([torch.get_num_threads(), *ignored])


def test_dataloader_workers_are_single_threaded_and_leave_signals_to_the_main_process():
    loader = DataLoader(_WorkerState(), num_workers=1, worker_init_fn=worker_init)
    assert next(iter(loader)).tolist() == [[1, 1, 1]]
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN  # the main process keeps its handlers


def test_train_threads_applies_to_the_run_only(tmp_path):
    with pytest.raises(MultiteachError, match=r"train\.threads: must be positive, got 0"):
        load_recipe(recipe_yaml(tmp_path), ["train.threads=0"])
    torch.set_num_threads(2)
    run = train(load_recipe(recipe_yaml(tmp_path, steps=1, checkpoint_every=1), ["train.threads=1"]))
    assert "intra-op threads per process: 1 (train.threads)" in (run / "train.log").read_text()
    assert torch.get_num_threads() == 2
