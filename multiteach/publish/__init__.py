"""Publishing a trained student: a plain timm export folder, its model card, a speed/size card and a Hub push.

Modules:
    export: writes the export files (``model.safetensors``, timm ``config.json``, ``heads.safetensors``,
        ``recipe.yaml``) into a folder swapped in atomically, refuses incomplete runs, and reads exports back.
    card: the model card (``README.md``) text of an export, its sections assembled by ``model_card``.
    provenance: the teachers a student learnt from and really loaded, the licence it inherits, its step and version.
    load_line: the one-line ``timm.create_model`` call that loads an export, and reading it back.
    speed: the speed/size card (params, GFLOPs, img/s, peak memory) of a student next to its teachers.
    merge: weight-space interpolation of two students of one architecture (WiSE-FT), written as an export.
    merged_card: the model card of such a merge (a parent's card with a "Merged parents" section).
    hub: the Hugging Face Hub push (private by default; the token is never printed or stored).
    redact: local-path redaction (``/home/me/tiles`` -> ``<local>/tiles``) shared by the export files and the card.

Every public name is importable from the package: ``from multiteach.publish import export_run, push_to_hub``.
"""

from multiteach.publish.card import CARD_TAGS, PLACEHOLDER_REPO, model_card
from multiteach.publish.export import (
    EXPORT_FILES,
    MASK_TOKEN_KEY,
    export_config,
    export_recipe_yaml,
    export_run,
    load_export,
    load_heads,
    split_shared,
)
from multiteach.publish.hub import check_repo_id, export_files, format_files, push_to_hub
from multiteach.publish.load_line import parse_load_line, timm_call_kwargs, timm_load_line
from multiteach.publish.merge import MergeWarning, interpolate_state, merge_students
from multiteach.publish.provenance import NC_LICENSE, card_license, teacher_rows
from multiteach.publish.redact import LOCAL_PLACEHOLDER, redact_local_path, redact_local_paths
from multiteach.publish.speed import batch1_latency, recipe_teacher_specs, run_speed, speed_card, speed_lines

__all__ = [
    "CARD_TAGS",
    "EXPORT_FILES",
    "LOCAL_PLACEHOLDER",
    "MASK_TOKEN_KEY",
    "MergeWarning",
    "NC_LICENSE",
    "PLACEHOLDER_REPO",
    "batch1_latency",
    "card_license",
    "check_repo_id",
    "export_config",
    "export_files",
    "export_recipe_yaml",
    "export_run",
    "format_files",
    "interpolate_state",
    "load_export",
    "load_heads",
    "merge_students",
    "model_card",
    "parse_load_line",
    "push_to_hub",
    "recipe_teacher_specs",
    "redact_local_path",
    "redact_local_paths",
    "run_speed",
    "speed_card",
    "speed_lines",
    "split_shared",
    "teacher_rows",
    "timm_call_kwargs",
    "timm_load_line",
]
