"""The speed/size card: params, GFLOPs per image, batch-1 latency, img/s and peak memory of a student next to its
teachers.

:func:`speed_card` times any mix of modules, catalog keys, timm names and export folders (peak memory from CUDA's
allocator on GPU, from a resident-set sampler thread on CPU; bf16/fp16 under autocast); :func:`run_speed` does it
for a run's student next to random-init copies of its teachers' real architectures. Throughput is measured at a
batch, latency at batch 1 (one tile at a time, as a scanner PC or a hospital server serves them: the median of
repeated forwards, with the thread count stated). The result goes into the model card's "Speed and size" table
(:mod:`multiteach.publish.card`) and is printed by ``multiteach export --speed`` (:func:`speed_lines`).
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
from multiteach.hardware import resolve_dtype
from multiteach.publish.export import load_export
from multiteach.publish.provenance import used_teachers
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


def batch1_latency(
    model: nn.Module,
    device: str | torch.device = "cpu",
    size: int = 224,
    dtype: torch.dtype = torch.float32,
    repeats: int = 30,
    warmup: int = 3,
) -> float:
    """Milliseconds per tile at batch 1: the median of ``repeats`` timed forwards after ``warmup`` untimed ones.

    Args:
        model: The module to time (in eval mode; called as ``model(x)``).
        device: Where it runs (CUDA is synchronised around each forward).
        size: Square input size in pixels.
        dtype: ``torch.bfloat16``/``float16`` (autocast) or ``float32``.
        repeats: Timed forwards (>= 1); the median resists a neighbour process's bursts better than the mean.
        warmup: Untimed forwards first (allocations, oneDNN kernel selection).

    Returns:
        Median wall-clock milliseconds of one (1, 3, size, size) forward, on ``torch.get_num_threads()`` threads
        on a CPU.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    times = []
    with torch.inference_mode(), _autocast(device, dtype):
        x = torch.randn(1, 3, size, size, device=device)
        for i in range(warmup + max(1, repeats)):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _measure(
    model: nn.Module,
    device: torch.device,
    size: int,
    batch: int,
    dtype: torch.dtype,
    repeats: int,
    latency_repeats: int = 0,
) -> dict:
    """Params, GFLOPs per image, img/s at ``batch``, batch-1 ms per tile (when ``latency_repeats``) and peak memory
    of one model."""
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
    out = {
        "params": int(params),
        "gflops": flops / 1e9,
        "img_per_s": batch / statistics.median(times),
        "peak_mem_mb": peak / 2**20,
    }
    if latency_repeats:
        out["latency_ms"] = batch1_latency(model, device, size, dtype, repeats=latency_repeats)
    return out


def speed_card(
    model_or_arch: Any,
    teachers: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    size: int = 224,
    batch: int = 8,
    dtype: torch.dtype | str = torch.bfloat16,
    repeats: int = 3,
    latency_repeats: int = 30,
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
        latency_repeats: Timed batch-1 forwards per model (:func:`batch1_latency`); 0 skips the latency.

    Returns:
        ``{"device", "dtype", "size", "batch", "threads", "latency", "memory", "flops", "models": {name: {"params",
        "gflops", "img_per_s", "latency_ms", "peak_mem_mb"}}}`` with the student under ``"student"``; ``threads`` is
        torch's intra-op thread count (None on GPU), ``latency`` says how ``latency_ms`` (milliseconds per tile at
        batch 1) was measured. GFLOPs are per image at ``size``
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
    models = {"student": _measure(student, device, size, batch, dtype, repeats, latency_repeats)}
    for name, spec in (teachers or {}).items():
        module = _materialise(spec, device)
        models[name] = _measure(module, device, size, batch, dtype, repeats, latency_repeats)
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
        "threads": None if device.type == "cuda" else torch.get_num_threads(),
        "latency": f"batch 1, median of {latency_repeats} forwards after 3 warm-ups" if latency_repeats else None,
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
    size: int | None = None,
    batch: int | None = None,
    progress: Any = None,
    latency_repeats: int = 30,
) -> dict[str, Any]:
    """:func:`speed_card` of a run's student next to random-init copies of its teachers' real architectures.

    Args:
        run_dir: A run directory.
        use_ema: Measure the EMA student (same architecture either way).
        device: Where to run; CUDA when available (bf16 where supported), else CPU (float32).
        size: Input size; the student's own (``student.img_size``, what its export's preprocessing gives) when
            None. 224 gives the usual GFLOPs figures.
        batch: Images per forward for the throughput; 32 on CUDA, 2 on CPU when None.
        progress: Called with a one-line message before measuring (e.g. ``print``), or None.
        latency_repeats: Timed batch-1 forwards per model for the latency (0 skips it).
    """
    run = load_run_student(run_dir, use_ema=use_ema)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or (32 if device.type == "cuda" else 2)
    size = int(size or run.recipe.student.img_size)
    # a CPU runs float32, as plain `timm.create_model(...)(x)` does (bf16 autocast is emulated on AVX2 CPUs, 10-20x
    # slower; with AVX512-BF16 it sped a ViT-Ti up ~1.2x at batch 1 and slowed a small ConvNeXt down); a GPU: bf16
    dtype = resolve_dtype("auto") if device.type == "cuda" else "float32"
    if progress is not None:
        progress(f"measuring speed on {device} ({dtype}, batch {batch} and batch 1, {size} px) ...")
    teachers = recipe_teacher_specs(run.recipe)
    return speed_card(
        run.student, teachers, device=device, size=size, batch=batch, dtype=dtype, latency_repeats=latency_repeats
    )


def speed_lines(speed: Mapping[str, Any]) -> list[str]:
    """One line per model of a :func:`speed_card` result, for a terminal, e.g.
    ``student: 0.91M params, 2.41 ms/tile at batch 1, 412.0 img/s at batch 32``, then where it was measured."""
    lines = []
    for name, m in speed["models"].items():
        latency = f"{m['latency_ms']:.2f} ms/tile at batch 1, " if m.get("latency_ms") is not None else ""
        lines.append(
            f"{name}: {m['params'] / 1e6:.2f}M params, {latency}{m['img_per_s']:.1f} img/s at batch {speed['batch']}"
        )
    lines.append(f"measured on {speed['device']}, {speed['dtype']}, {speed['size']} px")  # a CPU's names its threads
    return lines
