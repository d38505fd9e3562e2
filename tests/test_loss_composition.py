"""Composition of named, weighted loss terms from a recipe's ``losses:`` mapping."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from multiteach.errors import MultiteachError
from multiteach.heads import DINOHead
from multiteach.losses import LossContext, build_loss
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import TeacherOutput

from .teacher_helpers import n_params

D = 32  # student width
TEACHERS = {name: resolve_spec(name) for name in ("uni", "phikon", "conch", "virchow2")}
GPFM = {
    "uni.cls": {"type": "cosine", "teacher": "uni", "on": "summary", "weight": 1.0},
    "uni.patch": {"type": "mixed", "teacher": "uni", "on": "patch", "weight": 0.25},
    "phikon.cls": {"type": "cosine", "teacher": "phikon", "on": "summary", "weight": 0.5},
    "phikon.patch": {"type": "mixed", "teacher": "phikon", "on": "patch", "weight": 0.125},
    "conch.cls": {"type": "cosine", "teacher": "conch", "on": "summary", "weight": 1.0},
}
GPFM_HEADS = {t: {"kind": "gpfm", "shared": True, "bottleneck": 16} for t in ("uni", "phikon", "conch")}


def out(b, dim, grid, summary_dim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    return TeacherOutput(torch.randn(b, summary_dim or dim, generator=g), torch.randn(b, n, dim, generator=g), grid)


def teacher_outputs(b=4):
    return {
        name: out(b, spec.embed_dim, spec.grid_at(224), spec.summary_dim, seed=i)
        for i, (name, spec) in enumerate(TEACHERS.items())
    }


def test_gpfm_terms_print_and_sum():
    loss = build_loss(GPFM, D, TEACHERS, GPFM_HEADS)
    assert str(loss) == "Loss = 1*uni.cls + 0.25*uni.patch + 0.5*phikon.cls + 0.125*phikon.patch + 1*conch.cls"
    assert loss.teachers_used() == ["uni", "phikon", "conch"]
    student = out(4, D, (16, 16))  # patch-14 student at 224 vs patch-16 teachers at 224: grids resampled
    total, values = loss(LossContext(student, teacher_outputs()))
    expected = sum(GPFM[n]["weight"] * v for n, v in values.items())
    assert torch.allclose(total, expected) and set(values) == set(GPFM)
    total.backward()
    assert all(p.grad is not None for p in loss.heads.parameters())


def test_weight_zero_or_null_builds_nothing_and_loads_no_teacher():
    full = build_loss(GPFM, D, TEACHERS, GPFM_HEADS)
    no_conch = build_loss({**GPFM, "conch.cls": {**GPFM["conch.cls"], "weight": 0}}, D, TEACHERS, GPFM_HEADS)
    conch_head = n_params(full.heads.heads["conch"])
    assert n_params(full) - n_params(no_conch) == conch_head > 0
    assert "conch" not in no_conch.teachers_used()
    nulled = build_loss({**GPFM, "phikon.cls": None, "phikon.patch": None}, D, TEACHERS, GPFM_HEADS)
    assert "phikon" not in nulled.heads.teachers() and "phikon" not in nulled.teachers_used()
    # separate summary/patch heads: dropping the patch term drops exactly the patch head
    sep = {"uni": {"kind": "linear", "shared": False}}
    both = build_loss({k: GPFM[k] for k in ("uni.cls", "uni.patch")}, D, TEACHERS, sep)
    cls_only = build_loss(
        {"uni.cls": GPFM["uni.cls"], "uni.patch": {**GPFM["uni.patch"], "weight": 0}}, D, TEACHERS, sep
    )
    assert n_params(both) - n_params(cls_only) == D * 1024 + 1024


def test_virchow_cls_mean_summary_and_grid_choice():
    terms = {
        "v.cls": {"type": "cosine", "teacher": "virchow2", "on": "summary"},
        "v.patch": {"type": "smooth_l1", "teacher": "virchow2", "on": "patch", "resample_to": "teacher", "beta": 0.5},
    }
    loss = build_loss(terms, D, TEACHERS, {"virchow2": {"kind": "mlp"}})
    assert loss.heads.heads["virchow2"]["summary"](torch.zeros(1, D)).shape == (1, 2560)
    student = out(2, D, (14, 14))  # resampled to the teacher's 16x16
    total, values = loss(LossContext(student, teacher_outputs(2)))
    assert torch.isfinite(total)


def test_standardised_targets_and_kl():
    terms = {
        "u": {"type": "kl", "teacher": "uni", "temperature": 2.0, "standardize": "running"},
        "p": {"type": "mse", "teacher": "phikon", "standardize": "phi-s"},
    }
    loss = build_loss(terms, D, TEACHERS)
    loss(LossContext(out(8, D, (14, 14)), teacher_outputs(8)))
    assert int(loss.term("u").standardizer.count) == 8


@pytest.mark.parametrize(
    "losses, match",
    [
        ({"x": {"type": "cosin", "teacher": "uni"}}, r"losses\.x\.type: unknown loss term type 'cosin'.*cosine"),
        ({"x": {"type": "cosine", "teacher": "unii"}}, r"losses\.x\.teacher: teacher 'unii' is not configured.*uni"),
        (
            {"x": {"type": "cosine", "teacher": "uni", "weight": -1}},
            r"losses\.x\.weight: expected a number >= 0 \(0 or null switches the term off\), got -1",
        ),
        ({"x": {"type": "cosine", "teacher": "uni", "on": "patches"}}, r"losses\.x\.on: 'patches'.*patch"),
        (
            {"x": {"type": "cosine", "teacher": "uni", "tempreature": 1}},
            r"losses\.x\.tempreature: unknown key for type 'cosine'",
        ),
        ({"x": {"type": "cosine", "teacher": "summ", "on": "patch"}}, r"no patch tokens"),
        ({"x": {"weight": 1}}, r"losses\.x: missing 'type'"),
    ],
)
def test_bad_terms_name_the_term(losses, match):
    teachers = {**TEACHERS, "summ": resolve_spec("uni", patch_tokens=False)}
    with pytest.raises(MultiteachError, match=match):
        build_loss(losses, D, teachers)


def test_heads_that_do_not_fit_are_refused():
    terms = {
        "v.cls": {"type": "cosine", "teacher": "virchow2"},
        "v.patch": {"type": "cosine", "teacher": "virchow2", "on": "patch"},
    }
    with pytest.raises(MultiteachError, match=r"heads: .*virchow2"):  # one shared head for 2560-d and 1280-d
        build_loss(terms, D, TEACHERS, {"virchow2": {"kind": "gpfm", "shared": True}})
    with pytest.raises(MultiteachError, match=r"heads: .*bottleneck"):
        build_loss({"u": {"type": "cosine", "teacher": "uni"}}, D, TEACHERS, {"uni": {"kind": "gpfm", "bottleneck": 0}})


SELF = {
    "dino": {"type": "dino", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "ibot": {"type": "ibot", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "share_head_with": "dino"},
    "koleo": {"type": "koleo", "weight": 0.1},
}


def test_self_distillation_against_an_ema_copy():
    loss = build_loss(SELF, D, {})
    assert loss.term("ibot").head is loss.term("dino").head
    assert n_params(loss) == n_params(loss.term("dino").head)  # the shared head counts once
    ema = copy.deepcopy(loss).requires_grad_(False)
    b, n_global, n_local = 4, 2, 3
    masks = torch.zeros(n_global * b, 16, dtype=torch.bool)
    masks[::2, :5] = True
    ctx = LossContext(
        out(n_global * b, D, (4, 4)),
        {},
        n_global=n_global,
        student_local=out(n_local * b, D, (2, 2)),
        ema_global=out(n_global * b, D, (4, 4), seed=3),
        ema_terms={n: ema.term(n) for n in loss.names},
        masks=masks,
        teacher_temp=0.04,
    )
    total, values = loss(ctx)
    assert set(values) == {"dino", "ibot", "koleo"} and torch.isfinite(total)
    total.backward()
    assert loss.term("dino").head.mlp[0].weight.grad is not None
    assert loss.term("dino").loss.center.abs().sum() > 0  # centre moved in training mode


def test_ibot_needs_masks_unless_all_tokens():
    loss = build_loss({"ibot": SELF["ibot"] | {"share_head_with": None}}, D, {})
    ema = copy.deepcopy(loss)
    ctx = LossContext(out(4, D, (4, 4)), ema_global=out(4, D, (4, 4)), ema_terms={"ibot": ema.term("ibot")})
    with pytest.raises(MultiteachError, match="masked_only needs iBOT masks"):
        loss(ctx)
    all_tokens = build_loss({"ibot": SELF["ibot"] | {"share_head_with": None, "masked_only": False}}, D, {})
    ctx.ema_terms = {"ibot": copy.deepcopy(all_tokens).term("ibot")}
    assert torch.isfinite(all_tokens(ctx)[0])


def test_expert_target_heads_from_file(tmp_path):
    spec = {"hopt": resolve_spec("h-optimus-0")}
    cfg = {
        "dino": {
            "type": "dino",
            "out_dim": 64,
            "hidden_dim": 32,
            "bottleneck_dim": 16,
            "target": "hopt",
            "same_view_pairs": True,
        }
    }
    loss = build_loss(cfg, D, spec)
    assert loss.teachers_used() == ["hopt"]
    ctx = LossContext(out(4, D, (16, 16)), {"hopt": out(4, 1536, (16, 16))}, n_global=2)
    with pytest.raises(MultiteachError, match="expert heads of 'hopt' are not loaded"):
        loss(ctx)
    head = DINOHead(1536, 64, hidden_dim=32, bottleneck_dim=16)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "heads.safetensors"))
    loaded = build_loss({"dino": {**cfg["dino"], "target_heads": str(tmp_path / "heads.safetensors")}}, D, spec)
    assert torch.isfinite(loaded(ctx)[0])
    assert not any(p.requires_grad for p in loaded.term("dino").target_head.parameters())
