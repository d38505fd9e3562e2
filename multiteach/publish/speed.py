"""The speed/size card: params, GFLOPs per image, img/s and peak memory of a student next to its teachers.

:func:`speed_card` times any mix of modules, catalog keys, timm names and export folders (peak memory from CUDA's
allocator on GPU, from a resident-set sampler thread on CPU; bf16/fp16 under autocast); :func:`run_speed` does it
for a run's student next to random-init copies of its teachers' real architectures. The result goes into the
model card's "Speed and size" table (:mod:`multiteach.publish.card`).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.publish.card import used_teachers
from multiteach.publish.export import load_export
from multiteach.runs import load_run_student
from multiteach.students import Student
from multiteach.teachers import CATALOG, Teacher, build_teacher
from multiteach.teachers.timm_vit import create_timm

log = logging.getLogger("multiteach.publish.speed")


def _materialise(spec: Any, device: torch.device) -> nn.Module:
    """A module to time from a module, a catalog/timm name, or ``(timm arch, kwargs)``."""
    if isinstance(spec, Teacher):
        return spec.backbone.to(device).eval()
    if isinstance(spec, Student):
        return spec.model.to(device).eval()
    if isinstance(spec, nn.Module):
        return spec.to(device).eval()
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        arch, kwargs = spec
        return create_timm(str(arch), dict(kwargs), device=device).eval()
    if isinstance(spec, str):
        return build_teacher(spec, pretrained=False, dtype="float32", device=device).backbone.eval()
    raise MultiteachError(f"speed_card: cannot build a model from {spec!r}; pass a module, a name or (arch, kwargs)")


class _RssPeak:
    """Peak resident-set growth of this process while the context is open (sampled every millisecond)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _RssPeak:
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        """Bytes of RSS growth above the level at entry."""
        return self.peak - self.base


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    if dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield


def _measure(model: nn.Module, device: torch.device, size: int, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    """Params, GFLOPs per image, img/s and peak memory of one model."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        one = torch.randn(1, 3, size, size, device=device)
        counter = FlopCounterMode(display=False)
        with counter, _autocast(device, dtype):
            model(one)
        flops = counter.get_total_flops()
        x = torch.randn(batch, 3, size, size, device=device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        rss = _RssPeak() if not cuda else contextlib.nullcontext()
        with _autocast(device, dtype), rss:
            model(x)  # warm-up, inside the memory window: later forwards reuse its allocations
            if cuda:
                torch.cuda.synchronize(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss.growth
    return {
        "params": int(params),
        "gflops": flops / 1e9,
        "img_per_s": batch / statistics.median(times),
        "peak_mem_mb": peak / 2**20,
    }


def speed_card(
    model_or_arch: Any,
    teachers: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    size: int = 224,
    batch: int = 8,
    dtype: torch.dtype | str = torch.bfloat16,
    repeats: int = 3,
) -> dict[str, Any]:
    """Size and speed of a student next to its teachers, for the model card.

    Args:
        model_or_arch: The student: a module (a :class:`~multiteach.students.Student` counts its timm model),
            an export folder / ``local-dir:`` / ``hf-hub:`` source, a timm name, or ``(timm arch, kwargs)``.
        teachers: Name -> module, catalog key (random-init architecture of the real size, no weights needed),
            timm name, or ``(timm arch, kwargs)`` with layer names allowed (``mlp_layer: swiglu_packed``).
        device: Where to run.
        size: Square input size in pixels.
        batch: Images per timed forward (keep it small on CPU).
        dtype: ``torch.bfloat16``/``float16`` (autocast) or ``float32``.
        repeats: Timed forwards after one warm-up; img/s uses their median.

    Returns:
        ``{"device", "dtype", "size", "batch", "memory", "flops", "models": {name: {"params", "gflops",
        "img_per_s", "peak_mem_mb"}}}`` with the student under ``"student"``. GFLOPs are per image at ``size``
        counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add). ``memory`` says how
        peak memory was measured: CUDA ``max_memory_allocated`` (weights included) on GPU, peak RSS growth of the
        process during the warm-up and timed forwards on CPU (approximate: activations only, the weights were already
        resident and the allocator may reuse freed memory).
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    if isinstance(model_or_arch, (str, Path)) and (
        Path(str(model_or_arch).removeprefix("local-dir:")).is_dir() or str(model_or_arch).startswith("hf-hub:")
    ):
        student = load_export(model_or_arch).to(device)
    elif isinstance(model_or_arch, str) and timm.is_model(model_or_arch):
        student = _materialise((model_or_arch, {}), device)
    else:
        student = _materialise(model_or_arch, device)
    models = {"student": _measure(student, device, size, batch, dtype, repeats)}
    for name, spec in (teachers or {}).items():
        module = _materialise(spec, device)
        models[name] = _measure(module, device, size, batch, dtype, repeats)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    memory = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "batch": batch,
        "memory": memory,
        "flops": "FlopCounterMode, 2 per multiply-add, per image",
        "models": models,
    }


def recipe_teacher_specs(recipe: Any) -> dict[str, Any]:
    """Teachers of a recipe as :func:`speed_card` specs: catalog keys (with the recipe's kwargs) or timm names.

    Generic sources whose architecture is only known from a downloaded config are left out.
    """
    out: dict[str, Any] = {}
    for name in used_teachers(recipe):
        cfg = recipe.teachers[name]
        if cfg.source in CATALOG:
            spec = CATALOG.get(cfg.source)
            if spec.loader == "timm" and cfg.model_kwargs:
                out[name] = (spec.arch, {**spec.model_kwargs, **cfg.model_kwargs})
            else:
                out[name] = cfg.source
        elif timm.is_model(cfg.source):
            out[name] = (cfg.source, dict(cfg.model_kwargs))
        else:
            log.warning("speed: teacher %r (%s) skipped: its architecture needs its config", name, cfg.source)
    return out


def run_speed(
    run_dir: str | Path,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    size: int = 224,
    batch: int | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """:func:`speed_card` of a run's student next to random-init copies of its teachers' real architectures.

    Args:
        run_dir: A run directory.
        use_ema: Measure the EMA student (same architecture either way).
        device: Where to run; CUDA when available, else CPU.
        size: Input size (224 gives the usual GFLOPs figures).
        batch: Images per forward; 32 on CUDA, 2 on CPU when None.
        progress: Called with a one-line message before measuring (e.g. ``print``), or None.
    """
    run = load_run_student(run_dir, use_ema=use_ema)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or (32 if device.type == "cuda" else 2)
    if progress is not None:
        progress(f"measuring speed on {device} (batch {batch}, {size} px) ...")
    return speed_card(run.student, recipe_teacher_specs(run.recipe), device=device, size=size, batch=batch)
