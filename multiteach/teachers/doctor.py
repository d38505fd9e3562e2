"""The weights doctor: check a local teacher checkpoint against its catalog entry before any GPU time is spent.

``multiteach teachers --check NAME --weights PATH`` and :func:`check_weights` read only the file's header
(safetensors) or its memory-mapped pickle (``weights_only=True``; both read by
:mod:`multiteach.teachers.headers`), build the teacher's architecture on the meta device, apply the same
renaming the loader applies (the entry's stripped prefixes, DINOv2 conversion, CoCa text side dropped,
position-embedding resampling) and compare:

* missing / unexpected keys, grouped by prefix (first few, then a count), and shape mismatches;
* the ``config.json`` architecture (timm) or model config (transformers) against the catalog's;
* dtypes, and the size on disk against the header / the expected parameter count (truncated downloads);
* whether loading would run code from the Hub without the user's opt-in.

Each problem comes with its likely cause (wrong model variant, a ``module.``/``model.``/``teacher.backbone.``
wrapper prefix, a text tower in the file). The report is OK (exit 0) only when the loader will load the
file exactly; otherwise the CLI exits 2.

At training start, :func:`preflight` runs the same check for every pretrained teacher of a recipe.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.teachers import conch, conch_v15, hf_vit, resolve_spec, spec_overrides, timm_vit
from multiteach.teachers.base import TeacherSpec
from multiteach.teachers.catalog import CATALOG
from multiteach.teachers.headers import FileInfo, meta_tensor, read_file_info
from multiteach.teachers.keycheck import compare, vit_dims
from multiteach.teachers.weights import hub_weights, human_bytes, standin_of

log = logging.getLogger("multiteach.teachers.doctor")


@dataclass
class Report:
    """What the doctor found for one teacher and one weights file.

    Attributes:
        teacher: Teacher name (catalog key or source).
        file: The weights file (or folder / Hub id when it could not be resolved).
        problems: Reasons the teacher will not load as is, each with the fix when one is known.
        notes: What the loader will do to the file, dtypes and sizes (informational).
        catalog_architecture: True (``--check``): a ``config.json`` that describes another architecture than
            the catalog entry is a problem. False (training preflight): the loader builds the folder's own
            architecture (how stand-ins and fine-tuned variants are used), so it is a warning only.
        warnings: Findings that do not stop loading (architecture differences in preflight mode).
        recipe_name: The teacher's key in the recipe (preflight), for the run's record of what was loaded.
    """

    teacher: str
    file: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    catalog_architecture: bool = True
    warnings: list[str] = field(default_factory=list)
    recipe_name: str = ""

    def architecture_differs(self, message: str) -> None:
        """Record a config.json-vs-catalog difference as a problem or a warning (see ``catalog_architecture``)."""
        (self.problems if self.catalog_architecture else self.warnings).append(message)

    @property
    def ok(self) -> bool:
        """True when the teacher will load from this file exactly."""
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 when OK, 2 otherwise (the CLI's exit status)."""
        return 0 if self.ok else 2

    def render(self) -> str:
        """The report as lines of text for the terminal and for error messages."""
        head = f"teacher {self.teacher!r}, weights {self.file}"
        if self.ok:
            lines = [f"OK: {head} will load exactly."]
        else:
            lines = [f"FAIL: {head} will not load ({len(self.problems)} problem(s)):"]
            lines += [f"  - {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _dtype_note(tensors: dict[str, torch.Tensor]) -> str:
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point())
    if not counts:
        return "no floating-point tensors"
    if len(counts) == 1:
        ((name, n),) = counts.items()
        return f"dtype {name} (all {n} floating-point tensors)"
    return "mixed dtypes: " + ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def _size_checks(report: Report, info: FileInfo, model: nn.Module) -> None:
    n_params = sum(t.numel() for t in model.state_dict().values())
    float_sizes = [t.element_size() for t in info.tensors.values() if t.is_floating_point()]
    itemsize = Counter(float_sizes).most_common(1)[0][0] if float_sizes else 4
    expected = n_params * itemsize
    report.notes.append(
        f"{human_bytes(info.size)} on disk; {n_params / 1e6:.2f}M parameters expected "
        f"(~{human_bytes(expected)} at {itemsize} bytes each)"
    )
    if info.size < 0.9 * expected and not any("shape" in p or "missing" in p for p in report.problems):
        report.problems.append(
            f"the file is {human_bytes(info.size)} but {n_params / 1e6:.2f}M parameters need ~{human_bytes(expected)}: "
            "truncated download or another (smaller) model"
        )


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _compare_into(report: Report, model: nn.Module, sd: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()) -> None:
    diff = compare(_shapes(model.state_dict()), _shapes(sd), ignore)
    report.problems += diff.lines()
    if diff.ok:
        report.notes.append(f"all {len(model.state_dict())} tensors present with the expected shapes")


def _check_timm(spec: TeacherSpec, report: Report) -> None:
    config, path = timm_vit.find_files(spec)
    report.file = str(path)
    arch, kwargs = spec.arch, dict(spec.model_kwargs)
    catalog_model = timm_vit.create_timm(spec.arch, spec.model_kwargs) if spec.arch else None
    if config is not None:
        arch, kwargs, _ = timm_vit.resolve_spec_from_config(spec, config)
        report.notes.append(f"config.json: architecture {arch}, model_args {json.dumps(config.get('model_args', {}))}")
        if spec.arch and config.get("architecture") and config["architecture"] != spec.arch:
            report.architecture_differs(
                f"config.json names architecture {config['architecture']!r} but the catalog entry is {spec.arch!r}: "
                "wrong model variant, or `weights:` points at another model's folder"
            )
    model = timm_vit.create_timm(arch, kwargs)
    if catalog_model is not None and config is not None:
        loader, catalog = _shapes(model.state_dict()), _shapes(catalog_model.state_dict())
        if loader != catalog:
            got, want = vit_dims(loader), vit_dims(catalog)
            report.architecture_differs(
                f"config.json describes a {got.describe()}, not the {want.describe()} of the catalog entry: "
                "the folder holds another model (or set this teacher's model_kwargs to match)"
            )
    info = read_file_info(path)
    _note_wrappers(report, info)
    sd, notes = timm_vit.prepare_state_dict(spec, dict(info.tensors), model)
    report.notes += notes
    _compare_into(report, model, sd)
    report.notes.append(_dtype_note(info.tensors))
    _size_checks(report, info, model)


def _check_prepared(report: Report, path: Path, model: nn.Module, prepare: Any, size_check: bool = True) -> None:
    """Read ``path``'s header, apply the loader's own ``prepare(tensors) -> (state dict, notes)`` and compare."""
    report.file = str(path)
    info = read_file_info(path)
    _note_wrappers(report, info)
    sd, notes = prepare(dict(info.tensors))
    report.notes += notes
    _compare_into(report, model, sd)
    report.notes.append(_dtype_note(info.tensors))
    if size_check:
        _size_checks(report, info, model)


def _check_conch(spec: TeacherSpec, report: Report) -> None:
    # no size check: a CoCa checkpoint also holds the text towers the loader drops on purpose
    prepare = lambda tensors: conch.prepare_state_dict(spec, tensors)  # noqa: E731
    _check_prepared(report, conch.weights_file(spec), conch.architecture(spec), prepare, size_check=False)


def _check_conch_v15(spec: TeacherSpec, report: Report) -> None:
    model = conch_v15.architecture(spec)
    prepare = lambda tensors: conch_v15.prepare_state_dict(spec, tensors, model)  # noqa: E731
    _check_prepared(report, conch_v15.weights_file(spec), model, prepare)


_HF_SKIP = {"auto_map", "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
_HF_DIMS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "num_register_tokens")


def _hf_files(spec: TeacherSpec) -> list[Path]:
    if spec.weights:
        root = Path(spec.weights).expanduser()
        if root.is_file():
            return [root]
        index = root / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [root / s for s in shards]
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (root / name).is_file():
                return [root / name]
        raise MultiteachError(f"weights folder {root} holds no model.safetensors or pytorch_model.bin")
    if not spec.hub_id:
        raise MultiteachError(f"teacher {spec.name!r} has neither a hub_id nor `weights:`")
    return [hub_weights(spec.hub_id, spec.gated, ("model.safetensors", "pytorch_model.bin"), spec.revision)]


def _check_transformers(spec: TeacherSpec, report: Report) -> None:
    from transformers import AutoConfig

    raw = hf_vit.read_config(spec)
    if hf_vit.needs_remote_code(spec, raw) and not spec.trust_remote_code:
        report.problems.append(hf_vit.remote_code_refusal(spec, raw))
    catalog_cfg = hf_vit.config_class(spec.arch)(**spec.model_kwargs)
    if raw is None:
        config = catalog_cfg
    elif raw.get("auto_map") or raw.get("model_type") == catalog_cfg.model_type:
        # remote-code configs are read into the catalog's native class: the doctor never runs Hub code
        fields = {k: v for k, v in raw.items() if k not in _HF_SKIP}
        config = hf_vit.config_class(spec.arch)(**{**spec.model_kwargs, **fields})
    else:
        config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k not in _HF_SKIP})
    if raw is not None and spec.name in _catalog_names():
        wrong = [
            f"{k} {getattr(config, k, None)} (catalog {getattr(catalog_cfg, k, None)})"
            for k in (*_HF_DIMS, "use_swiglu_ffn")
            if getattr(config, k, None) != getattr(catalog_cfg, k, None)
        ]
        if wrong or config.model_type != catalog_cfg.model_type and not raw.get("auto_map"):
            report.architecture_differs(
                f"config.json describes another model than the catalog entry ({config.model_type}: "
                f"{', '.join(wrong) or 'model type differs'}): wrong model variant, or `weights:` points at "
                "another model's folder"
            )
    with torch.device("meta"):
        model = hf_vit.model_from_config(config)
    files = _hf_files(spec)
    report.file = str(files[0] if len(files) == 1 else files[0].parent)
    tensors: dict[str, torch.Tensor] = {}
    size = 0
    for f in files:
        info = read_file_info(f)
        _note_wrappers(report, info)
        tensors.update(info.tensors)
        size += info.size
    prefix = f"{model.base_model_prefix}."
    if tensors and all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
        report.notes.append(f"the {prefix!r} prefix is stripped by transformers itself")
    tensors = _hf_renamed(model, tensors, report)
    ignore = ("pooler.",) if not any(k.startswith("pooler.") for k in model.state_dict()) else ()
    if ignore and any(k.startswith(ignore) for k in tensors):
        report.notes.append("pooler.* weights present and unused (the teacher reads last_hidden_state)")
    _compare_into(report, model, tensors, ignore)
    report.notes.append(_dtype_note(tensors))
    _size_checks(report, FileInfo(tensors, [], size, None), model)


def _hf_renamed(model: nn.Module, tensors: dict[str, torch.Tensor], report: Report) -> dict[str, torch.Tensor]:
    """Apply transformers' own checkpoint conversions to the key names (e.g. 4.x ``attention.attention.query``
    -> 5.x ``attention.q_proj``; DINOv2 SwiGLU ``weights_in`` -> ``gate_proj`` + ``up_proj``), as
    ``from_pretrained`` does for a native class."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers without conversion mappings loads checkpoints under their own names
        return tensors
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    converted = 0
    for key, tensor in tensors.items():
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if pattern is None:
            out[new] = tensor
            converted += new != key
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        targets = [new.replace(conv.target_patterns[0], t) for t in conv.target_patterns]
        shape = list(tensor.shape)
        shape[0] //= len(targets)  # the one-to-many converters split dim 0 (Chunk)
        for target in targets:
            out[target] = meta_tensor(shape, tensor.dtype)
        converted += 1
    if converted:
        report.notes.append(f"{converted} key(s) renamed by transformers' own checkpoint conversion, as at load")
    return out


def _check_open_clip(spec: TeacherSpec, report: Report) -> None:
    import open_clip

    if spec.arch.startswith("local-dir:"):
        root = Path(spec.arch[len("local-dir:") :]).expanduser()
        names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        path = next((root / n for n in names if (root / n).is_file()), root / names[0])
    elif spec.weights:
        path = Path(spec.weights).expanduser()
    else:
        raise MultiteachError(
            f"teacher {spec.name!r}: the doctor checks open_clip models from a local file or a local-dir: folder"
        )
    report.file = str(path)
    with torch.device("meta"):
        model = open_clip.create_model(spec.arch, load_weights=False, pretrained_text=False, device="meta")
    info = read_file_info(path)
    _note_wrappers(report, info)
    _compare_into(report, model, info.tensors)
    report.notes.append(_dtype_note(info.tensors))


def _note_wrappers(report: Report, info: FileInfo) -> None:
    if info.wrappers:
        report.notes.append(
            "unwrapped the checkpoint dict: " + " -> ".join(repr(w) for w in info.wrappers) + " (as the loader does)"
        )


def _catalog_names() -> set[str]:
    return set(CATALOG.keys())


_CHECKS = {
    "timm": _check_timm,
    "conch": _check_conch,
    "conch_v15": _check_conch_v15,
    "transformers": _check_transformers,
    "open_clip": _check_open_clip,
}


def check_teacher(spec: TeacherSpec, catalog_architecture: bool = True) -> Report:
    """Check the weights a teacher ``spec`` would load (its ``weights:`` or its Hub files).

    Never raises for a bad file: every failure becomes a problem in the report, naming the teacher and the
    file. Reads headers / memory-mapped pickles only; the architecture lives on the meta device.

    Args:
        spec: The teacher (``weights`` / ``hub_id`` say where its files are).
        catalog_architecture: Whether a folder whose config.json describes another architecture than the
            catalog entry fails the check (True, ``--check``) or only warns (False, training preflight).
    """
    report = Report(spec.name, str(spec.weights or spec.hub_id or spec.arch), catalog_architecture=catalog_architecture)
    try:
        _CHECKS[spec.loader](spec, report)
    except MultiteachError as exc:
        report.problems.append(str(exc))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        report.problems.append(f"cannot check it: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return report


def check_weights(
    spec: TeacherSpec | str, path: str | Path, *, trust_remote_code: bool | None = None, **overrides: Any
) -> Report:
    """Check a local checkpoint against a teacher's catalog entry (``multiteach teachers --check``).

    Args:
        spec: A :class:`TeacherSpec` (e.g. with a recipe's overrides applied) or a catalog key / source.
        path: The weights file or folder (what the recipe's ``weights:`` would say).
        trust_remote_code: The user's opt-in for teachers whose loading runs Hub code (None: the spec's).
        **overrides: :class:`TeacherSpec` fields to replace when ``spec`` is a name (``model_kwargs=...``).

    Returns:
        The :class:`Report`; ``report.ok`` (exit code 0) only when the teacher will load exactly.
    """
    if isinstance(spec, str):
        spec = resolve_spec(spec, **overrides)
    elif overrides:
        spec = spec.replace(**overrides)
    spec = spec.replace(weights=str(path))
    if trust_remote_code is not None:
        spec = spec.replace(trust_remote_code=trust_remote_code)
    return check_teacher(spec)


def preflight(recipe: Any, names: Iterable[str]) -> list[Report]:
    """Check the weights of a recipe's pretrained teachers before training starts.

    Teachers with ``pretrained: false`` and plain timm names (timm fetches and checks those) are skipped. Call
    it before building the teachers: it reads headers only, so it costs seconds, not a failed run.

    Args:
        recipe: A validated recipe (``recipe.teachers[name]`` is a ``TeacherConfig``).
        names: Teacher names the run will load.

    Returns:
        One report per checked teacher.

    Raises:
        MultiteachError: listing every failing teacher's report.
    """
    reports = []
    for name in names:
        cfg = recipe.teachers[name]
        if not cfg.pretrained:
            continue
        spec = resolve_spec(cfg.source, **spec_overrides(cfg))
        if cfg.weights:
            spec = spec.replace(weights=cfg.weights)
        if not spec.weights and not spec.hub_id and spec.loader == "timm":
            continue  # a plain timm name: timm fetches and checks its own weights
        report = check_teacher(spec, catalog_architecture=False)
        report.teacher = f"{name} ({cfg.source})" if name != cfg.source else name
        report.recipe_name = name
        standin = standin_of(spec.weights)
        if standin and report.warnings:  # the demo's and the tests' own stand-ins differ on purpose
            log.info(
                "teacher %r: `weights:` is a tiny random stand-in of %s written by multiteach (expected in the demo "
                "and the tests): it loads with its own architecture, and its features mean nothing",
                name,
                standin,
            )
        for warning in [] if standin else report.warnings:
            log.warning("teacher %r: %s; training loads the folder's own architecture", name, warning)
        reports.append(report)
    bad = [r for r in reports if not r.ok]
    if bad:
        raise MultiteachError(
            "teacher weights will not load:\n" + "\n".join(r.render() for r in bad) + "\nFix them before training."
        )
    return reports
