"""Tiny stand-ins of real teacher families, written in the exact on-disk formats the real weights use.

Teacher weights cannot be downloaded everywhere (CI, air-gapped clusters, this project's own dev
machines). These helpers write small random-initialised models of the same families into a local
Hugging Face cache (``models--ORG--NAME/refs/main`` + ``snapshots/<sha>/...``) or a plain folder, so
the real loading code runs end to end offline. They are used by the tests and the CPU demo; they
carry no pretrained knowledge, but their outputs do depend on the image (tested), so a student can
fit them. For a teacher that knows something, use the shipped ``multiteach-tiny``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from multiteach.atomic import atomic_save_safetensors, atomic_write_json
from multiteach.layers import resolve_layer_kwargs
from multiteach.teachers import conch, resolve_spec
from multiteach.teachers.weights import STANDIN_KEY

# Architecture kwargs of the tiny stand-ins, by family; each keeps its family's token layout traits.
TINY_TIMM: dict[str, tuple[str, dict[str, Any]]] = {
    # ViT-L/16 family (UNI): CLS only, LayerScale
    "uni": (
        "vit_large_patch16_224",
        {"img_size": 224, "init_values": 1e-5, "embed_dim": 64, "depth": 2, "num_heads": 2},
    ),
    # ViT-g/14 reg4 SwiGLU family (H-optimus-0/1, H0-mini): CLS + 4 registers
    "h-optimus-0": (
        "vit_giant_patch14_reg4_dinov2",
        {
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "embed_dim": 96,
            "depth": 2,
            "num_heads": 2,
            "no_embed_class": True,
        },
    ),
    # ViT-H/14 SwiGLU family (Virchow2): CLS + 4 registers, CLS||mean embedding
    "virchow2": (
        "vit_huge_patch14_224",
        {
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "embed_dim": 96,
            "depth": 2,
            "num_heads": 2,
        },
    ),
}
SWIGLU_FAMILIES = {"h-optimus-0", "virchow2"}


def fake_commit(text: str) -> str:
    """A deterministic 40-hex 'commit id' for a hand-built cache snapshot."""
    return hashlib.sha1(text.encode()).hexdigest()


def write_cache_repo(cache_dir: str | Path, repo_id: str, files: dict[str, Callable[[Path], None]]) -> Path:
    """Create a Hugging Face cache entry for ``repo_id`` holding ``files``.

    Args:
        cache_dir: The hub cache (``$HF_HOME/hub``).
        repo_id: ``ORG/NAME``.
        files: File name -> writer called with the destination path.

    Returns:
        The snapshot folder.
    """
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    sha = fake_commit(repo_id)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for name, write in files.items():
        write(snap / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snap


def timm_config(
    arch: str,
    model_args: dict[str, Any],
    num_features: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_size: int,
    interpolation: str = "bicubic",
) -> dict[str, Any]:
    """A timm hub ``config.json`` as the public repos write it (non-JSON layer args left out)."""
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": "token",
        "model_args": {k: v for k, v in model_args.items() if k not in ("mlp_layer", "act_layer", "norm_layer")},
        "pretrained_cfg": {
            "tag": "multiteach",
            "input_size": [3, input_size, input_size],
            "fixed_input_size": False,
            "interpolation": interpolation,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
        },
    }


def tiny_timm(family: str, seed: int = 0) -> tuple[nn.Module, str, dict[str, Any]]:
    """A random-initialised tiny timm model of ``family`` (a key of :data:`TINY_TIMM`).

    Returns:
        (model in eval mode, timm arch name, JSON model args including layer names).
    """
    arch, args = TINY_TIMM[family]
    args = dict(args)
    if family in SWIGLU_FAMILIES:
        args.update(mlp_layer="swiglu_packed", act_layer="silu")
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **resolve_layer_kwargs(args)).eval()
    _wake_layer_scale(model)
    return model, arch, args


def _wake_layer_scale(model: nn.Module, value: float = 1.0) -> None:
    """Set every LayerScale gain to ``value``.

    The families' ``init_values=1e-5`` is right for training from scratch, but on random weights it makes
    every block a no-op: the summary token is then the same vector for every image, a dead teacher whose
    targets teach nothing. Trained checkpoints have gains far from 1e-5; the stand-ins keep the parameter
    (same keys and shapes as the real weights) with a value that lets the image reach the output.
    """
    with torch.no_grad():
        for module in model.modules():
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.fill_(value)


def save_timm_folder(
    model: nn.Module,
    folder: str | Path,
    arch: str,
    model_args: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_size: int = 224,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in timm's hub layout."""
    folder = Path(folder)
    cfg = timm_config(arch, model_args, int(model.num_features), mean, std, input_size)
    atomic_write_json(folder / "config.json", cfg)
    atomic_save_safetensors(folder / "model.safetensors", model.state_dict())
    return folder


def timm_to_cache(
    model: nn.Module,
    cache_dir: str | Path,
    repo_id: str,
    arch: str,
    model_args: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_size: int = 224,
) -> Path:
    """Place a timm model into a hand-built HF cache entry for ``repo_id``."""
    with tempfile.TemporaryDirectory() as tmp:
        save_timm_folder(model, tmp, arch, model_args, mean, std, input_size)
        return write_cache_repo(
            cache_dir,
            repo_id,
            {
                name: (lambda dst, n=name: shutil.copyfile(Path(tmp) / n, dst))
                for name in ("config.json", "model.safetensors")
            },
        )


def tiny_hf_vit(kind: str = "vit", seed: int = 0) -> nn.Module:
    """A tiny transformers model: ``vit`` (Phikon family), ``dinov2`` (Phikon-v2) or ``dinov2_reg`` (Hibou)."""
    import transformers

    torch.manual_seed(seed)
    common = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "image_size": 224,
    }
    if kind == "vit":
        return transformers.ViTModel(transformers.ViTConfig(patch_size=16, **common), add_pooling_layer=False).eval()
    if kind == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(patch_size=16, **common)).eval()
    if kind == "dinov2_reg":
        cfg = transformers.Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4, **common)
        return transformers.Dinov2WithRegistersModel(cfg).eval()
    raise ValueError(f"unknown transformers stand-in {kind!r}")


TINY_CONCH = {
    "embed_dim": 32,
    "embed_dim_caption": 48,
    "vision_cfg": {"layers": 2, "width": 64, "num_heads": 2, "image_size": 64, "n_queries_caption": 4},
}


def tiny_conch_state(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny CONCH visual tower and its checkpoint dict in the CoCa layout (``visual.*`` keys)."""
    torch.manual_seed(seed)
    visual = conch.architecture(resolve_spec("conch", model_kwargs=TINY_CONCH), device="cpu").eval()
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state["text.dummy"] = torch.zeros(1)  # a full CoCa checkpoint carries the text towers too
    return visual, state


def write_standin_teachers(folder: str | Path, names: tuple[str, ...] = ("h-optimus-0", "uni")) -> dict[str, Path]:
    """Write tiny stand-ins for catalog teachers of the :data:`TINY_TIMM` families, with each teacher's own
    mean/std, in timm's hub layout; return teacher name -> folder (what a recipe's ``weights:`` takes).

    Each ``config.json`` names the teacher it stands in for (``multiteach_standin``), so the weights doctor
    reports it as an expected stand-in and the model card as random weights, never as that teacher.
    """
    out = {}
    for i, name in enumerate(names):
        spec = resolve_spec(name)
        model, arch, args = tiny_timm(name, seed=i)
        out[name] = save_timm_folder(model, Path(folder) / name, arch, args, spec.mean, spec.std)
        config = json.loads((out[name] / "config.json").read_text())
        atomic_write_json(out[name] / "config.json", {**config, STANDIN_KEY: name})  # the doctor and card know it
    return out
