"""Dead teachers and dead terms are caught; agreement measures a constant teacher cannot pass; stand-ins are alive."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.eval.agreement import centred_cosine, linear_cka, mutual_knn, spread
from multiteach.eval.transfer import fitted_centred_cosine
from multiteach.health import FlatTermWatch, standardizer_problems, teacher_problems
from multiteach.losses.standardize import RunningStandardizer
from multiteach.standins import TINY_TIMM, save_timm_folder, tiny_conch_state, tiny_hf_vit, tiny_timm
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, TeacherOutput
from multiteach.teachers.conch import ConchTokens
from multiteach.train import train

from .engine_fixtures import recipe_yaml

# --------------------------------------------------------------------------- agreement measures


def test_a_constant_teacher_scores_zero_never_one():
    torch.manual_seed(0)
    const = torch.randn(1, 32).expand(50, 32)
    pred = const + 1e-3 * torch.randn(50, 32)  # raw cosine ~1 with the constant
    raw = torch.nn.functional.cosine_similarity(pred, const, dim=1).mean()
    assert raw > 0.99
    assert centred_cosine(pred, const) == 0.0
    assert linear_cka(pred, const) == 0.0
    assert spread(const) == 0.0


def test_agreement_of_identical_related_and_unrelated_embeddings():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    rot = torch.linalg.qr(torch.randn(16, 16))[0]
    assert centred_cosine(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ rot * 3.0) == pytest.approx(1.0)  # rotation and scale invariant
    assert mutual_knn(x, x @ rot, k=10) == pytest.approx(1.0)
    unrelated = torch.randn(200, 24)
    assert linear_cka(x, unrelated) < 0.3
    assert mutual_knn(x, unrelated, k=10) < 0.15  # chance is 10 / 199
    # a noisy linear image of the teacher is recovered by the fitted map; unrelated features are not
    related = x @ torch.randn(16, 40) + 0.1 * torch.randn(200, 40)
    assert fitted_centred_cosine(related, x) > 0.9
    assert abs(fitted_centred_cosine(unrelated, x)) < 0.3


def test_agreement_rejects_bad_input():
    with pytest.raises(MultiteachError, match="same images"):
        linear_cka(torch.zeros(5, 3), torch.zeros(6, 3))
    with pytest.raises(MultiteachError, match="k=10"):
        mutual_knn(torch.randn(8, 3), torch.randn(8, 3), k=10)
    with pytest.raises(MultiteachError, match="NaN"):
        spread(torch.tensor([[float("nan")], [1.0]]))


# --------------------------------------------------------------------------- stand-ins are alive


def _outputs_vary(summary: torch.Tensor, patches: torch.Tensor) -> None:
    assert spread(summary) > 1e-2, spread(summary)
    assert spread(patches.flatten(1)) > 1e-2


@pytest.mark.parametrize("family", sorted(TINY_TIMM))
def test_timm_standins_vary_across_images(family):
    model, _, _ = tiny_timm(family)
    x = torch.rand(6, 3, 224, 224)
    with torch.inference_mode():
        tokens = model.forward_features(x)
    _outputs_vary(tokens[:, 0], tokens[:, model.num_prefix_tokens :])


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_reg"])
def test_transformers_standins_vary_across_images(kind):
    model = tiny_hf_vit(kind)
    with torch.inference_mode():
        hidden = model(pixel_values=torch.rand(6, 3, 224, 224)).last_hidden_state
    prefix = 5 if kind == "dinov2_reg" else 1
    _outputs_vary(hidden[:, 0], hidden[:, prefix:])


def test_conch_standin_varies_across_images():
    visual, _ = tiny_conch_state()
    with torch.inference_mode():
        out = ConchTokens(visual, "pooled")(torch.rand(6, 3, 64, 64))
    _outputs_vary(out.summary, out.patch_tokens)


# --------------------------------------------------------------------------- health checks


def _dead_uni(folder):
    """A UNI-family stand-in as the old init left it: LayerScale 1e-5, the CLS output ~ constant."""
    model, arch, args = tiny_timm("uni")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "gamma", None), torch.nn.Parameter):
                m.gamma.fill_(1e-5)
    return save_timm_folder(model, folder, arch, args, IMAGENET_MEAN, IMAGENET_STD)


def test_teacher_problems_name_a_constant_teacher():
    torch.manual_seed(0)
    alive = TeacherOutput(torch.randn(8, 16), torch.randn(8, 4, 16), (2, 2))
    dead = TeacherOutput(torch.ones(8, 16), torch.randn(8, 4, 16), (2, 2))
    assert teacher_problems({"alive": alive}) == []
    problems = teacher_problems({"alive": alive, "uni": dead})
    assert len(problems) == 1 and "'uni'" in problems[0] and "summary" in problems[0]
    assert "spread 0 <" in problems[0] and "wrong or missing weights" in problems[0]


def test_standardizer_problems_name_a_zero_variance_term():
    class Term(torch.nn.Module):
        def __init__(self, x):
            super().__init__()
            self.standardizer = RunningStandardizer(x.shape[1])
            self.standardizer.update(x)

    class Loss(torch.nn.Module):
        names = ["a", "b"]

        def __init__(self):
            super().__init__()
            self.t = {"a": Term(torch.randn(8, 4)), "b": Term(torch.full((8, 4), 3.0))}

        def term(self, name):
            return self.t[name]

    problems = standardizer_problems(Loss())
    assert len(problems) == 1 and "'b'" in problems[0] and "variance ~0" in problems[0]


def test_flat_term_watch():
    watch = FlatTermWatch(window=3)
    for step, v in enumerate([0.9, 0.8, 0.85], 1):
        assert watch.update({"moving": v, "flat": 1.0}, step * 10) == [] or step == 3
    assert watch.flat == ["flat"]
    with pytest.raises(MultiteachError, match="'flat' has stayed at 1"):
        strict = FlatTermWatch(window=2, mode="error")
        strict.update({"flat": 1.0}, 1)
        strict.update({"flat": 1.0}, 2)


def test_training_warns_on_a_dead_teacher_and_errors_in_strict_mode(tmp_path, caplog):
    path = recipe_yaml(tmp_path, steps=2, checkpoint_every=2)
    dead = _dead_uni(tmp_path / "dead_uni")
    with caplog.at_level(logging.WARNING, logger="multiteach"):
        train(load_recipe(path, [f"teachers.uni.weights={dead}", f"output_dir={tmp_path / 'warn'}"]))
    warned = [r.getMessage() for r in caplog.records if "health check" in r.getMessage()]
    assert any("teacher 'uni'" in m and "summary" in m for m in warned), warned
    with pytest.raises(MultiteachError, match="health check failed"):
        overrides = [f"teachers.uni.weights={dead}", f"output_dir={tmp_path / 'strict'}", "train.health_check=error"]
        train(load_recipe(path, overrides))


def test_training_is_silent_on_a_live_teacher(tmp_path, caplog):
    path = recipe_yaml(tmp_path, steps=2, checkpoint_every=2)
    with caplog.at_level(logging.WARNING, logger="multiteach"):
        run_dir = train(load_recipe(path, ["train.health_check=error"]))  # would raise on any problem
    assert not [r for r in caplog.records if "health check" in r.getMessage()]
    # the end-of-run summary: printed/logged, and written as summary.json
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and (summary["steps_done"], summary["steps_planned"]) == (2, 2)
    assert set(summary["terms"]) == {"loss", "uni.cls", "uni.patch", "dino", "ibot"}
    assert all(set(v) == {"first", "last"} for v in summary["terms"].values())
    assert summary["img_per_s"] > 0 and summary["warnings"] == [] and summary["skipped_tiles"] == 0
    assert "run finished: 2 of 2 steps" in (run_dir / "train.log").read_text()
    assert (run_dir / "curves.png").is_file()  # per-term curves of the run


def test_summary_lists_the_health_warnings(tmp_path):
    path = recipe_yaml(tmp_path, steps=2, checkpoint_every=2)
    dead = _dead_uni(tmp_path / "dead_uni")
    run_dir = train(load_recipe(path, [f"teachers.uni.weights={dead}"]))
    warnings = json.loads((run_dir / "summary.json").read_text())["warnings"]
    assert any("teacher 'uni'" in w for w in warnings), warnings
