"""transformers-backed teachers: Phikon (ViT), Phikon-v2 (DINOv2), Hibou (DINOv2 + registers), and any
transformers vision model id or folder. transformers itself builds on the meta device and loads
safetensors; we only pick the class and split the tokens.

Code from the Hub is opt-in: a repo whose ``config.json`` maps its classes to its own Python files
(``auto_map``, Hibou) is refused with the reason unless the teacher's ``trust_remote_code`` is set, and
catalog entries pin the Hub revision their facts were checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.teachers.base import TeacherOutput, TeacherSpec, TokenBackbone, split_tokens
from multiteach.teachers.weights import hub_file, read_json


class HFTokens(TokenBackbone):
    """Adapter for a transformers ViT-like model: ``last_hidden_state`` -> summary + patch tokens.

    Args:
        model: ``ViTModel``/``Dinov2Model``/``Dinov2WithRegistersModel``-like module.
        embedding: Tile-embedding rule (``cls``, ``cls+mean``, ``pooled`` = ``pooler_output``).
        num_prefix: CLS + register tokens.
        patch_size: Patch size in pixels.
    """

    def __init__(self, model: nn.Module, embedding: str, num_prefix: int, patch_size: int) -> None:
        super().__init__()
        self.model = model
        self.embedding = embedding
        self.num_prefix = num_prefix
        self.patch = patch_size
        self._interpolate = model.config.model_type == "vit"

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised -> TeacherOutput(summary (B, Ds), patches (B, H/p*W/p, D), grid)."""
        kw = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=x, **kw)
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        pooled = getattr(out, "pooler_output", None)
        return split_tokens(out.last_hidden_state, self.num_prefix, grid, self.embedding, pooled)


def config_class(name: str) -> Any:
    """The transformers config class named ``name`` (``ViTConfig``, ``Dinov2WithRegistersConfig``, ...)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not name.endswith("Config"):
        raise MultiteachError(f"unknown transformers config class {name!r} (e.g. ViTConfig, Dinov2Config)")
    return cls


def model_from_config(config: Any) -> nn.Module:
    """The model class for a native transformers config (never code from the Hub)."""
    from transformers import AutoModel, ViTModel

    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def architecture(spec: TeacherSpec) -> nn.Module:
    """The catalog architecture on the meta device."""
    config = config_class(spec.arch)(**spec.model_kwargs)
    with torch.device("meta"):
        return model_from_config(config)


def _num_prefix(config: Any) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def source_of(spec: TeacherSpec) -> str:
    """Where transformers loads ``spec`` from: the ``weights:`` folder or the hub id."""
    source = str(Path(spec.weights).expanduser()) if spec.weights else spec.hub_id
    if source is None:
        raise MultiteachError(f"teacher {spec.name!r} has neither a hub_id nor `weights:`")
    return source


def read_config(spec: TeacherSpec) -> dict[str, Any] | None:
    """The raw ``config.json`` of ``spec``'s weights (folder or cached/downloadable Hub file), None if absent."""
    if spec.weights:
        path = Path(spec.weights).expanduser()
        path = path if path.is_dir() else path.parent
        return read_json(path / "config.json") if (path / "config.json").is_file() else None
    if spec.hub_id:
        try:
            return read_json(hub_file(spec.hub_id, "config.json", spec.gated, spec.revision))
        except (FileNotFoundError, MultiteachError):
            return None
    return None


def needs_remote_code(spec: TeacherSpec, config: dict[str, Any] | None) -> bool:
    """Whether loading runs code from the repo: ``config.json`` maps classes to repo files (``auto_map``), or,
    when the config cannot be read yet, the catalog says the repo does (``remote_code``). A local folder saved
    with a native transformers class needs no repo code, whatever the entry."""
    if config is not None:
        return bool(config.get("auto_map"))
    return spec.remote_code


def remote_code_refusal(spec: TeacherSpec, config: dict[str, Any] | None) -> str:
    """Why a teacher that needs ``trust_remote_code`` is refused, and how to opt in."""
    modules = sorted({str(v).split(".")[0] + ".py" for v in (config or {}).get("auto_map", {}).values()})
    code = f" ({', '.join(modules)})" if modules else ""
    pin = (
        f" The catalog pins revision {spec.revision}, the commit its facts were checked against, so the code that "
        "runs is that commit's."
        if spec.revision and not spec.weights
        else ""
    )
    return (
        f"teacher {spec.name!r} ({source_of(spec)}) needs trust_remote_code: transformers would import and run "
        f"Python code shipped in the model repo{code}, and multiteach does not run code from the Hub unless you "
        "ask for it. Read that code first; then opt in for this teacher: `trust_remote_code: true` under its "
        "entry in the recipe's `teachers:` (or the override teachers.<name>.trust_remote_code=true), or "
        f"--trust-remote-code with `multiteach teachers --check`.{pin}"
    )


def load(
    spec: TeacherSpec, pretrained: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[HFTokens, TeacherSpec]:
    """Load a transformers teacher from ``weights:`` (a folder) or its hub id.

    A teacher whose weights need code from the repo (``auto_map``; the catalog's ``remote_code``) is refused
    unless ``spec.trust_remote_code`` is set; Hub downloads are pinned to ``spec.revision``.

    Returns:
        The adapter and the spec updated with the model's real width, patch size and prefix tokens.
    """
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from transformers import AutoConfig, AutoModel, ViTModel

    source = source_of(spec)
    if not pretrained:
        model = model_from_config(config_class(spec.arch)(**spec.model_kwargs))
    else:
        raw_config = read_config(spec)
        if needs_remote_code(spec, raw_config) and not spec.trust_remote_code:
            raise MultiteachError(remote_code_refusal(spec, raw_config))
        remote = spec.trust_remote_code
        pin = {"revision": spec.revision} if spec.revision and not spec.weights else {}
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=remote, **pin)
            if config.model_type == "vit":
                model = ViTModel.from_pretrained(source, add_pooling_layer=False, dtype=dtype, **pin)
            else:
                model = AutoModel.from_pretrained(source, trust_remote_code=remote, dtype=dtype, **pin)
        except GatedRepoError:
            raise MultiteachError(
                f"teacher {spec.name!r}: {source} is gated: accept its terms on huggingface.co and run "
                "`hf auth login`, or point `weights:` at a local folder"
            ) from None
        except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as exc:
            gated = " (gated: accept its terms and `hf auth login`)" if spec.gated else ""
            raise MultiteachError(
                f"teacher {spec.name!r}: cannot load transformers model {source!r}{gated}: "
                f"{str(exc).splitlines()[0]}. Offline, copy the Hugging Face cache or point `weights:` at a local "
                "folder."
            ) from None
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise MultiteachError(remote_code_refusal(spec, raw_config)) from None
            raise
    model = model.to(dtype).eval()
    cfg = model.config
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    resolved = spec.replace(
        embed_dim=int(cfg.hidden_size), patch_size=int(patch), num_prefix_tokens=_num_prefix(cfg), summary_dim=None
    )
    return HFTokens(model, spec.embedding, resolved.num_prefix_tokens, resolved.patch_size), resolved
