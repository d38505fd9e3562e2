"""Export: a run becomes a plain timm model folder that loads with timm alone, a model card, and a Hub push."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import multiteach
import multiteach.publish.export as export
from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.publish import (
    EXPORT_FILES,
    MASK_TOKEN_KEY,
    card_license,
    export_config,
    export_recipe_yaml,
    export_run,
    load_export,
    load_heads,
    model_card,
    parse_load_line,
    push_to_hub,
    redact_local_path,
    speed_card,
    speed_lines,
    split_shared,
    teacher_rows,
)
from multiteach.publish.card import teacher_card_files
from multiteach.runs import load_run_student
from multiteach.standins import write_cache_repo
from multiteach.train import train

from .engine_fixtures import recipe_yaml

HOPTIMUS_MEAN = [0.707223, 0.578729, 0.703617]
HOPTIMUS_STD = [0.211883, 0.230117, 0.177517]
# H0-mini's architecture family (ViT/14, 4 registers, SwiGLU), tiny.
SWIGLU_OVERRIDES = [
    "student.arch=vit_small_patch14_reg4_dinov2",
    "student.img_size=56",
    "student.kwargs={depth: 2, mlp_ratio: 5.33334, mlp_layer: swiglu_packed, act_layer: silu}",
    f"student.mean={HOPTIMUS_MEAN}",
    f"student.std={HOPTIMUS_STD}",
    "data.global_crops.size=56",
    "data.local_crops.size=28",
]
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step run of the engine fixture (ViT-Ti/16 student, `uni` teacher stand-in)."""
    root = tmp_path_factory.mktemp("tiny")
    return train(load_recipe(recipe_yaml(root, steps=2, checkpoint_every=2)))


@pytest.fixture(scope="module")
def swiglu_run(tmp_path_factory) -> Path:
    """A 2-step run whose student is a tiny SwiGLU + 4-register ViT/14 (the H0-mini family)."""
    root = tmp_path_factory.mktemp("swiglu")
    return train(load_recipe(recipe_yaml(root, steps=2, checkpoint_every=2), SWIGLU_OVERRIDES))


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    return export_run(tiny_run, tmp_path_factory.mktemp("exports") / "tiny")


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _card_load_line(card: str) -> str:
    lines = [line for line in card.splitlines() if line.startswith("model = timm.create_model(")]
    assert len(lines) == 1, lines
    return lines[0]


def _to_cache(hf_cache: Path, repo_id: str, folder: Path) -> None:
    write_cache_repo(
        hf_cache, repo_id, {name: (lambda dst, n=name: shutil.copyfile(folder / n, dst)) for name in EXPORT_FILES}
    )


def _reference_tokens(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    student = load_run_student(run_dir).student
    with torch.no_grad():
        return student.model.forward_features(x)


# ------------------------------------------------------------------------------------------------ round trips


def test_export_round_trips_through_plain_timm(tiny_run, tiny_export, hf_cache):
    out = tiny_export
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600
    weights = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("student.") or "mask_token" in k for k in weights)

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 0 and config["num_features"] == 192
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["pretrained_cfg"]["interpolation"] == "bicubic" and config["pretrained_cfg"]["crop_pct"] == 1.0
    assert config["multiteach"]["weights"] == "ema" and config["multiteach"]["step"] == 2

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    expected = _reference_tokens(tiny_run, x)
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, img_size=64).load_state_dict(weights)
    _to_cache(hf_cache, "multiteach-test/tiny", out)
    hub = timm.create_model("hf-hub:multiteach-test/tiny", pretrained=True).eval()
    with torch.no_grad():
        for model in (local, hub):
            torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(model(x), expected[:, 0], rtol=0, atol=1e-6)  # CLS = tile embedding
    data = timm.data.resolve_data_config({}, model=local)
    assert tuple(data["mean"]) == (0.485, 0.456, 0.406) and tuple(data["input_size"]) == (3, 64, 64)


def test_swiglu_register_student_loads_with_the_cards_exact_line(swiglu_run, tmp_path, hf_cache):
    out = export_run(swiglu_run, tmp_path / "h0mini-tiny", repo_id="multiteach-test/h0mini-tiny")
    config = json.loads((out / "config.json").read_text())
    assert "mlp_layer" not in config["model_args"] and "act_layer" not in config["model_args"]
    assert config["model_args"]["mlp_ratio"] == 5.33334
    assert config["multiteach"]["layer_kwargs"] == {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
    assert config["multiteach"]["num_registers"] == 4
    assert config["pretrained_cfg"]["mean"] == HOPTIMUS_MEAN and config["pretrained_cfg"]["input_size"] == [3, 56, 56]

    card = (out / "README.md").read_text()
    line = _card_load_line(card)
    assert line == (
        'model = timm.create_model("hf-hub:multiteach-test/h0mini-tiny", pretrained=True, '
        "mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)"
    )
    source, kwargs = parse_load_line(line)
    assert kwargs == {"pretrained": True, "mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}

    torch.manual_seed(0)
    x = torch.randn(2, 3, 56, 56)
    expected = _reference_tokens(swiglu_run, x)
    assert expected.shape == (2, 5 + 16, 384)
    _to_cache(hf_cache, "multiteach-test/h0mini-tiny", out)
    models = [
        timm.create_model(source, **kwargs),  # exactly what the card prints
        timm.create_model(f"local-dir:{out}", **kwargs),
        load_export(out),  # multiteach: layer names from config.json, no call-time arguments
    ]
    with torch.no_grad():
        for model in models:
            torch.testing.assert_close(model.eval().forward_features(x), expected, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="size mismatch"):  # why the card's layer arguments are needed
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_heads_hold_every_loss_tensor(tiny_run, tiny_export):
    state = load_run_student(tiny_run).state
    heads = load_heads(tiny_export)
    assert {k for k in heads if k != MASK_TOKEN_KEY} == {k for k in state if k.startswith("loss.")}
    assert any(k.startswith("loss.terms.dino.head.") for k in heads)
    assert any(k.startswith("loss.heads.heads.uni.") for k in heads)
    for key, value in state.items():
        assert torch.equal(heads[key], value), key
    assert heads[MASK_TOKEN_KEY].shape == (1, 1, 192)


def test_shared_tensors_are_written_once_and_restored(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    unique, aliases = split_shared({"a": base, "tied": base, "part": base[1:], "other": torch.ones(2)})
    assert aliases == {"tied": "a"}
    save_file(unique, str(tmp_path / "t.safetensors"))  # safetensors refuses shared memory: nothing shared is left
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["part"], base[1:])


# ------------------------------------------------------------------------------------------------ model card


def test_model_card_licence_front_matter_and_sections(tiny_run, tiny_export):
    card = (tiny_export / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "timm"
    assert front["license"] == "other"  # the `uni` weights are another model (below): no UNI licence claimed
    assert front["tags"] == ["pathology", "multiteach", "distillation"]
    assert front["pipeline_tag"] == "image-feature-extraction"
    # the same run credited as the catalog's UNI: its licence, Hub page and gating
    as_uni = model_card(load_run_student(tiny_run), tiny_run, loaded={"uni": {"source": "uni", "catalog_model": True}})
    assert _front_matter(as_uni)["license"] == "cc-by-nc-nd-4.0"
    assert "**Non-commercial use only.**" in as_uni and "may not be used commercially" in as_uni
    assert "Gated teacher(s): uni" in as_uni
    assert "| uni | [uni](https://huggingface.co/MahmoodLab/UNI) | CC-BY-NC-ND-4.0 | yes | yes |" in as_uni
    assert "Loss = 1*uni.cls + 0.5*uni.patch + 1*dino + 1*ibot" in card
    assert "`vit_tiny_patch16_224` (1.04M params)" in card and '"depth": 2, "img_size": 64}`, random init' in card
    assert f"the `multiteach` Python package, version {multiteach.__version__} (Apache-2.0)" in card
    assert "github.com" not in card  # no unchecked repository address
    assert "2 planned, 2 completed" in card and "batch: 8 images per step" in card
    assert "24 tiles from" in card
    assert 'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)' in card
    assert "mean [0.485, 0.456, 0.406]" in card
    assert "## Evaluation" not in card and "## Speed and size" not in card


def test_model_card_generic_teacher_expert_heads_and_tables(tiny_run, tiny_export):
    run = load_run_student(tiny_run)
    recipe = load_recipe(
        tiny_run / "recipe.yaml", [f"teachers.uni.source=local-dir:{tiny_run.parent / 'uni'}", "losses.dino.target=uni"]
    )
    generic = dataclasses.replace(run, recipe=recipe)
    speed = {"device": "CPU", "dtype": "float32", "size": 224, "batch": 2, "memory": "cpu_peak_rss_growth"}
    speed["latency"] = "batch 1, median of 30 forwards after 3 warm-ups"
    speed["models"] = {
        "student": {"params": 5_000_000, "gflops": 1.25, "latency_ms": 2.5, "img_per_s": 100.0, "peak_mem_mb": 12.0}
    }
    card = model_card(generic, tiny_run, evaluation={"student": {"knn_acc": 0.8125, "f1": 0.5}}, speed=speed)
    assert _front_matter(card)["license"] == "other"
    assert "| uni | `local-dir:<local>/uni` | unknown — yours to state (below) | — | unknown |" in card
    assert "- `uni`: not a catalog teacher: multiteach knows nothing about its weights or licence." in card
    assert "Non-commercial" not in card
    assert "**fitted**" in card and "`dino`" in card
    assert "| model | knn_acc | f1 |" in card and "| student | 0.8125 | 0.5 |" in card
    assert "| model | params (M) | GFLOPs/img | batch-1 ms/tile | img/s | peak memory (MB) |" in card
    assert "| student | 5 | 1.25 | 2.5 | 100 | 12 |" in card and "(latency: batch 1, median of 30 forwards" in card

    front, lines = card_license(teacher_rows(load_recipe(tiny_run / "recipe.yaml", ["teachers.uni.source=uni"])))
    assert front == {"license": "cc-by-nc-nd-4.0"}


def test_a_teacher_folder_holding_another_model_is_described_as_what_it_is(tiny_run, tiny_export):
    """The engine fixture's `uni` folder is a 2-block, 64-wide ViT: never credited as UNI or under UNI's licence."""
    card = (tiny_export / "README.md").read_text()
    digest = hashlib.sha256((tiny_run.parent / "uni" / "model.safetensors").read_bytes()).hexdigest()
    assert "| uni | other weights (below) | unknown — yours to state (below) | — | unknown |" in card
    line = next(x for x in card.splitlines() if x.startswith("- `uni`: not the catalog's `uni`"))
    assert "the weights doctor found another model" in line and "(width 64, 2 blocks, patch 16)" in line
    assert f"weights file `model.safetensors`, sha256 `{digest}`" in line
    assert "yours to state (`multiteach export --licence-note uni=TEXT`)" in line
    for claim in ("MahmoodLab", "CC-BY-NC-ND", "Non-commercial", "Gated teacher", "cc-by-nc-nd"):
        assert claim not in card, claim
    record = json.loads((tiny_run / "teachers.json").read_text())["uni"]  # written at training time
    assert record["catalog_model"] is False and record["sha256"] == digest


def test_card_of_an_init_from_student_links_the_shipped_teacher_card(tiny_run):
    """The same run as if its student had started from `multiteach-tiny`'s blocks and distilled from it too."""
    tiny = [
        "teachers.multiteach-tiny={input_size: 64}",
        "losses.tiny.cls={type: cosine, teacher: multiteach-tiny}",
        "student.init_from=multiteach-tiny",
    ]
    run = load_run_student(tiny_run)
    recipe = load_recipe(tiny_run / "recipe.yaml", tiny)
    card = model_card(dataclasses.replace(run, recipe=recipe), tiny_run)
    assert (
        "initialised from teacher `multiteach-tiny` (`student.init_from`): its patch embedding, class/register "
        "tokens, positional embedding, final norm and blocks [0, 11] of its 12, one per student block" in card
    )
    assert "random init" not in card
    # the shipped teacher's card travels with the export, and the link to it is relative (it works on the Hub)
    assert "| multiteach-tiny | [multiteach-tiny](teacher-card-multiteach-tiny.md) | Apache-2.0 | no | no |" in card
    assert "multiteach/assets" not in card
    files = teacher_card_files(teacher_rows(recipe))
    shipped = Path(multiteach.__file__).parent / "assets" / "teachers" / "multiteach-tiny" / "README.md"
    assert files == {"teacher-card-multiteach-tiny.md": shipped}


def test_licence_note_states_the_licence_of_a_teacher_multiteach_does_not_know(tiny_run, tmp_path):
    out = tmp_path / "export"
    note = ["--licence-note", "uni=CC-BY-4.0 (our own fine-tune, https://example.org/terms)"]
    assert main(["export", str(tiny_run), "--out", str(out), *note]) == 0
    card = (out / "README.md").read_text()
    assert "Licence, as stated by the exporter: CC-BY-4.0 (our own fine-tune, https://example.org/terms)" in card
    assert "| uni | other weights (below) | stated below | — | unknown |" in card
    front = _front_matter(card)
    assert (front["license"], front["license_name"]) == ("other", "stated-in-model-card")


# ------------------------------------------------------------------------------------------------ local paths


def _temp_roots(tmp_path_factory) -> list[str]:
    """The absolute paths of this session's temp folders (every fixture's tiles, weights and runs lie below)."""
    base = tmp_path_factory.getbasetemp()
    return sorted({str(base), os.path.realpath(base)})


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header, read as JSON (the header is the file's first N bytes)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(size))["__metadata__"]


def _path_leaks(folder: Path, needles: list[str]) -> list[str]:
    """``file: needle`` for every needle found in any file of ``folder`` (raw bytes, and safetensors metadata)."""
    leaks = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        texts = [path.read_bytes().decode("utf-8", errors="replace")]
        if path.suffix == ".safetensors":
            texts.append(json.dumps(_safetensors_metadata(path)))
        leaks += [f"{path.name}: {n}" for n in needles if any(n in text for text in texts)]
    return leaks


def test_export_leaks_no_local_path(tiny_run, tiny_export, tmp_path_factory):
    roots = _temp_roots(tmp_path_factory)
    assert any(root in (tiny_run / "recipe.yaml").read_text() for root in roots)  # the run itself names them
    assert _safetensors_metadata(tiny_export / "heads.safetensors")["weights"] == "ema"  # the header parse works
    assert _path_leaks(tiny_export, roots) == []

    recipe = yaml.safe_load((tiny_export / "recipe.yaml").read_text())
    assert recipe["data"]["train"] == "<local>/tiles"
    assert recipe["teachers"]["uni"]["weights"] == "<local>/uni"
    assert recipe["output_dir"] == "<local>/run"
    assert load_recipe(tiny_export / "recipe.yaml").teachers["uni"].weights.endswith("<local>/uni")  # still a recipe

    card = (tiny_export / "README.md").read_text()
    assert "24 tiles from `<local>/tiles`" in card
    assert "its local paths (data, teacher weights, output folder) read `<local>/` + the file or folder name" in card
    assert "(`multiteach export --keep-paths` keeps them)" in card


def test_cli_keep_paths_keeps_them_in_the_recipe_only(tiny_run, tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "kept"
    assert main(["export", str(tiny_run), "--out", str(out), "--keep-paths"]) == 0
    assert f"exported to {out}" in capsys.readouterr().out
    roots = _temp_roots(tmp_path_factory)
    assert {leak.split(":")[0] for leak in _path_leaks(out, roots)} == {"recipe.yaml"}
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["data"]["train"] == str(tiny_run.parent / "tiles")
    assert recipe["teachers"]["uni"]["weights"] == str(tiny_run.parent / "uni")
    card = (out / "README.md").read_text()
    assert "it keeps the local paths of the training machine (exported with `--keep-paths`)" in card


def test_local_dir_teachers_and_path_names_are_redacted(tiny_run, tmp_path_factory):
    run = load_run_student(tiny_run)
    recipe = load_recipe(tiny_run / "recipe.yaml", [f"teachers.uni.source=local-dir:{tiny_run.parent / 'uni'}"])
    generic = dataclasses.replace(run, recipe=recipe)
    card = model_card(generic, tiny_run, evaluation={str(tiny_run): {"knn_bacc": 0.5}})
    config = export_config(generic)
    text = export_recipe_yaml(recipe)
    for root in _temp_roots(tmp_path_factory):
        assert root in recipe.to_yaml()
        assert root not in card and root not in json.dumps(config) and root not in text
    assert "| uni | `local-dir:<local>/uni` | unknown — yours to state (below) |" in card
    assert "| `<local>/run` | 0.5 |" in card
    assert config["multiteach"]["teachers"] == {"uni": "local-dir:<local>/uni"}
    assert yaml.safe_load(text)["teachers"]["uni"]["source"] == "local-dir:<local>/uni"


@pytest.mark.parametrize(
    "value, redacted",
    [
        ("/home/me/data/tiles", "<local>/tiles"),
        ("/home/me/data/tiles/", "<local>/tiles"),
        ("~/weights/uni.safetensors", "<local>/uni.safetensors"),
        ("local-dir:/models/uni", "local-dir:<local>/uni"),
        ("open_clip:local-dir:/models/plip", "open_clip:local-dir:<local>/plip"),
        ("transformers:/models/phikon", "transformers:<local>/phikon"),
        ("C:\\Users\\me\\tiles", "<local>/tiles"),
        ("/", "<local>"),
        ("hf-hub:org/name", "hf-hub:org/name"),
        ("uni", "uni"),
        ("runs/{name}", "runs/{name}"),
        ("<local>/tiles", "<local>/tiles"),
    ],
)
def test_redact_local_path(value, redacted):
    assert redact_local_path(value) == redacted


def test_speed_card_student_and_teacher_architectures(tiny_run):
    student = load_run_student(tiny_run).student
    teacher = ("vit_small_patch14_reg4_dinov2", {"depth": 1, "mlp_layer": "swiglu_packed", "act_layer": "silu"})
    kwargs = {"device": "cpu", "size": 112, "batch": 2, "dtype": torch.float32, "repeats": 2, "latency_repeats": 3}
    card = speed_card(student, {"teacher": teacher}, **kwargs)
    assert card["memory"] == "cpu_peak_rss_growth" and card["size"] == 112
    assert card["threads"] == torch.get_num_threads() and "median of 3" in card["latency"]
    s, t = card["models"]["student"], card["models"]["teacher"]
    assert s["params"] == sum(p.numel() for p in student.model.parameters())
    assert 0 < s["gflops"] < t["gflops"]
    assert s["img_per_s"] > 0 and s["peak_mem_mb"] >= 0
    assert s["latency_ms"] > 0 and t["latency_ms"] > 0  # batch-1 ms per tile, for the student and each teacher
    lines = speed_lines(card)
    assert lines[0].startswith("student: ") and " ms/tile at batch 1, " in lines[0] and "img/s at batch 2" in lines[0]
    assert lines[1].startswith("teacher: ") and lines[-1].startswith("measured on CPU (")


# ------------------------------------------------------------------------------------------------ hub


class FakeApi:
    """Records what an ``HfApi`` would have been asked to do."""

    instances: list[FakeApi] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> SimpleNamespace:
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = sorted(p.name for p in folder.iterdir() if p.name in kwargs["allow_patterns"])
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")


def test_push_uploads_the_export_privately(tiny_export):
    api = FakeApi()
    result = push_to_hub(tiny_export, "org/tiny", api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create = api.calls[0][1]
    assert create["repo_id"] == "org/tiny" and create["private"] is True and create["exist_ok"] is True
    assert api.uploaded == sorted(EXPORT_FILES)
    assert [path for path, _ in result["files"]] == sorted(EXPORT_FILES)
    assert result["private"] is True and result["commit_url"].endswith("/commit/abc")

    assert push_to_hub(tiny_export, "org/tiny", private=False, api=FakeApi())["private"] is False
    with pytest.raises(MultiteachError, match="ORG/NAME"):
        push_to_hub(tiny_export, "no-org", api=FakeApi())


def test_token_never_leaks(tiny_run, tiny_export, tmp_path, monkeypatch, capsys, caplog):
    import huggingface_hub

    caplog.set_level(logging.DEBUG)
    FakeApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = push_to_hub(tiny_export, "org/tiny", token=FAKE_TOKEN)
    assert FakeApi.instances[-1].token == FAKE_TOKEN  # handed to HfApi, and nowhere else
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # the CLI leaves the token to huggingface_hub's usual places
    cli_out = tmp_path / "cli"
    assert main(["export", str(tiny_run), "--out", str(cli_out), "--push", "org/x", "--public"]) == 0
    assert FakeApi.instances[-1].token is None and FakeApi.instances[-1].calls[0][1]["private"] is False
    captured = capsys.readouterr()
    assert "uploaded to org/x (public" in captured.out
    assert FAKE_TOKEN not in json.dumps(result, default=str)
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text
    for path in [*tiny_export.rglob("*"), *cli_out.rglob("*")]:
        assert FAKE_TOKEN.encode() not in path.read_bytes()


def test_dry_run_lists_files_and_contacts_nothing(tiny_export):
    api = FakeApi()
    result = push_to_hub(tiny_export, "org/tiny", dry_run=True, api=api)
    assert api.calls == []
    assert result["dry_run"] is True and result["private"] is True
    assert result["files"] == [(name, (tiny_export / name).stat().st_size) for name in sorted(EXPORT_FILES)]


def test_cli_export_and_dry_run_push(tiny_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not build an HfApi")

    monkeypatch.setattr(huggingface_hub, "HfApi", refuse)
    out = tmp_path / "cli-export"
    assert main(["export", str(tiny_run), "--out", str(out), "--live", "--push", "org/tiny", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"exported to {out}" in printed
    assert "would upload to org/tiny (private" in printed
    for name in EXPORT_FILES:
        assert f"{(out / name).stat().st_size:,d}  {name}" in printed
    assert json.loads((out / "config.json").read_text())["multiteach"]["weights"] == "live"
    assert 'timm.create_model("hf-hub:org/tiny"' in (out / "README.md").read_text()

    assert main(["export", str(tiny_run), "--out", str(out)]) == 2  # exists, not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "x"), "--dry-run"]) == 2  # needs --push


# ------------------------------------------------------------------------------------------------ bad input


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_non_empty_out_dir_is_refused_unless_overwrite(tiny_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MultiteachError, match="not empty"):
        export_run(tiny_run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    export_run(tiny_run, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert _siblings(out) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_run(tiny_run, empty) == empty.resolve()
    with pytest.raises(MultiteachError, match="run directory"):
        export_run(tiny_run, tiny_run, overwrite=True)  # would delete the run


def test_a_failing_export_leaves_the_previous_one_intact(tiny_run, tmp_path, monkeypatch):
    out = export_run(tiny_run, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(tiny_run, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == []
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(tiny_run, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and _siblings(tmp_path / "fresh") == []


def test_not_a_run_directory_and_no_checkpoint(tiny_run, tmp_path):
    with pytest.raises(MultiteachError, match="not a run directory"):
        export_run(tmp_path / "nowhere", tmp_path / "out")
    bare = tmp_path / "bare-run"
    bare.mkdir()
    shutil.copy(tiny_run / "recipe.yaml", bare / "recipe.yaml")
    with pytest.raises(MultiteachError, match="no complete checkpoint"):
        export_run(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MultiteachError, match="not a multiteach export"):
        push_to_hub(bare, "org/x", dry_run=True)
