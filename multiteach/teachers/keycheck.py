"""Compare a checkpoint's keys and shapes with an architecture's, and say in words what is wrong.

Shared by the loaders (so a failed load explains itself) and the weights doctor
(:mod:`multiteach.teachers.doctor`). Works on ``name -> shape`` maps only, so it never needs the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Shapes = Mapping[str, tuple[int, ...]]

# Wrapper prefixes seen on real checkpoints (DDP, Lightning, DINO/iBOT teachers, CLIP towers).
KNOWN_PREFIXES = (
    "module.",
    "model.",
    "state_dict.",
    "teacher.backbone.",
    "student.backbone.",
    "teacher.",
    "student.",
    "backbone.",
    "encoder.",
    "visual.trunk.",
    "visual.",
    "trunk.",
    "vision_model.",
    "image_encoder.",
)
# Keys that belong to a text tower (CoCa/CLIP checkpoints).
TEXT_PREFIXES = ("text.", "text_decoder.", "text_model.", "transformer.", "token_embedding.", "ln_final.")
TEXT_KEYS = ("logit_scale", "text_projection", "positional_embedding")
SHOW = 5
_INDEX = re.compile(r"\.(\d+)(?=\.|$)")
_WIDTH_NAMES = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H", 1408: "g", 1536: "g"}


def preview(keys: Iterable[str], n: int = SHOW) -> str:
    """``a, b, c, … (+N more)``: the first ``n`` keys and how many are left out."""
    keys = list(keys)
    head = ", ".join(keys[:n])
    return head + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


def group_keys(keys: Iterable[str]) -> list[str]:
    """Group keys by their leading module path with block indices folded (``blocks.* (144 keys)``).

    Returns:
        One ``prefix (N keys)`` string per group, largest first.
    """
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        head = _INDEX.sub(".*", ".".join(parts[:2]))
        groups[head] = groups.get(head, 0) + 1
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    return [f"{name} ({count} key{'s' if count != 1 else ''})" for name, count in ordered]


def common_prefix(keys: Iterable[str]) -> str:
    """The longest dotted prefix (ending in ``.``) every key shares, or ``""``."""
    keys = list(keys)
    if not keys:
        return ""
    parts = keys[0].split(".")[:-1]
    prefix = ""
    for part in parts:
        candidate = prefix + part + "."
        if all(k.startswith(candidate) for k in keys):
            prefix = candidate
        else:
            break
    return prefix


def text_tower_keys(keys: Iterable[str]) -> list[str]:
    """Keys that look like a text tower (CoCa/CLIP text encoder, decoder, logit scale)."""
    return [k for k in keys if k.startswith(TEXT_PREFIXES) or k in TEXT_KEYS]


@dataclass(frozen=True)
class VitDims:
    """What a ViT checkpoint's shapes say about its size."""

    width: int | None
    depth: int | None
    patch: int | None

    def describe(self) -> str:
        size = _WIDTH_NAMES.get(self.width or 0, "?")
        patch = f"/{self.patch}" if self.patch else ""
        return f"ViT-{size}{patch} (width {self.width}, {self.depth} blocks, patch {self.patch})"


def vit_dims(shapes: Shapes) -> VitDims:
    """Width, depth and patch size of a ViT from its parameter shapes (timm, DINOv2 or transformers names)."""
    width = depth = patch = None
    for key, shape in shapes.items():
        if key.endswith(("patch_embed.proj.weight", "patch_embeddings.projection.weight")) and len(shape) == 4:
            width, patch = shape[0], shape[-1]
        match = re.search(r"(?:^|\.)(?:blocks|layer|layers)\.(\d+)\.", key)
        if match:
            depth = max(depth or 0, int(match.group(1)) + 1)
    return VitDims(width, depth, patch)


@dataclass
class KeyDiff:
    """How a checkpoint's ``name -> shape`` map differs from an architecture's.

    Attributes:
        missing: Keys the architecture needs that the file lacks.
        unexpected: Keys in the file the architecture does not have.
        wrong_shape: ``(key, expected shape, file shape)`` for shared keys that disagree.
        causes: Likely causes with the fix, in words.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def lines(self) -> list[str]:
        """The differences, grouped by prefix, first few keys then a count; likely causes last."""
        out = []
        if self.wrong_shape:
            shown = "; ".join(f"{k} expects {e} but file has {g}" for k, e, g in self.wrong_shape[:SHOW])
            more = f" (+{len(self.wrong_shape) - SHOW} more)" if len(self.wrong_shape) > SHOW else ""
            out.append(f"shape mismatch in {len(self.wrong_shape)} tensor(s): {shown}{more}")
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                out.append(
                    f"{len(keys)} {label} key(s), by prefix: {'; '.join(group_keys(keys)[:SHOW])} "
                    f"— e.g. {preview(keys, 3)}"
                )
        out += [f"likely cause: {c}" for c in self.causes]
        return out


def compare(expected: Shapes, found: Shapes, ignore_unexpected: Iterable[str] = ()) -> KeyDiff:
    """Compare an architecture's ``expected`` shapes with a checkpoint's ``found`` shapes and guess why they differ.

    Args:
        expected: Architecture ``name -> shape``.
        found: Checkpoint ``name -> shape`` (after the loader's own renaming).
        ignore_unexpected: Prefixes of file keys the loader drops on purpose.
    """
    ignore = tuple(ignore_unexpected)
    diff = KeyDiff(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected and not (ignore and k.startswith(ignore))],
        wrong_shape=[
            (k, tuple(s), tuple(found[k])) for k, s in expected.items() if k in found and tuple(found[k]) != tuple(s)
        ],
    )
    if not diff.ok:
        diff.causes = likely_causes(expected, found, diff)
    return diff


def _strip(found: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}


def likely_causes(expected: Shapes, found: Shapes, diff: KeyDiff) -> list[str]:
    """Guess why ``found`` does not fit ``expected``: a wrapper prefix, a text tower, a wrong variant."""
    causes = []
    exp_keys = set(expected)
    text = text_tower_keys(found)
    # a prefix that, once stripped, makes the image keys fit
    candidates = [p for p in (common_prefix([k for k in found if k not in text]),) if p] + list(KNOWN_PREFIXES)
    for prefix in dict.fromkeys(candidates):
        stripped = _strip(found, prefix)
        if stripped and exp_keys <= set(stripped):
            n = sum(1 for k in found if k.startswith(prefix))
            extra = len(set(found) - {prefix + k for k in exp_keys})
            causes.append(
                f"the keys carry a {prefix!r} prefix ({n} keys; e.g. saved from a wrapper module such as "
                f"DistributedDataParallel, Lightning or a DINO teacher): re-save the inner module's state_dict, or "
                f"strip the prefix: {{k.removeprefix({prefix!r}): v for k, v in sd.items()}}"
                + (f"; {extra} other key(s) then remain to drop" if extra else "")
            )
            break
    if text:
        causes.append(
            f"the file holds a text tower ({len(text)} keys: {'; '.join(group_keys(text)[:3])}): this entry "
            "loads an image tower only; save the image tower's state_dict alone (or point `weights:` at the "
            "vision-only file the model card names)"
        )
    exp_dims, got_dims = vit_dims(expected), vit_dims(found)
    if got_dims.width and exp_dims.width and (got_dims.width, got_dims.depth) != (exp_dims.width, exp_dims.depth):
        causes.append(
            f"wrong model variant: the file looks like a {got_dims.describe()}, this entry expects a "
            f"{exp_dims.describe()}; check that `weights:` points at this teacher's checkpoint"
        )
    elif diff.wrong_shape and not causes:
        causes.append("same layout, different sizes: a sibling model or other architecture kwargs (model_kwargs)")
    if not causes and diff.missing and not diff.unexpected:
        causes.append("the file is incomplete (a partial or truncated save?)")
    return causes
