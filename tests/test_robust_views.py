"""Robust views (``data.robust_views``): pixel-aligned perturbed student views, the switch off unchanged,
the invariance term, held-out severities, bad input at config time; and ``student.init_from``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from multiteach.build import build_components, data_loader, robust_views, training_source
from multiteach.config import load_recipe
from multiteach.data.views.perturb import (
    DEFAULT_RANGES,
    ORDER,
    Perturbation,
    RobustViews,
    heldout_levels,
    heldout_suite,
)
from multiteach.errors import MultiteachError
from multiteach.losses import LossContext
from multiteach.losses.terms import InvarianceTerm
from multiteach.students import build_student, init_from_teacher, spread_blocks
from multiteach.teachers.base import TeacherOutput

from .engine_fixtures import recipe_yaml


def _first_batch(recipe):
    comps = build_components(recipe)
    loader = data_loader(recipe, training_source(recipe), comps.model.student, rank=0, world_size=1, start_step=0)
    return next(iter(loader))


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return recipe_yaml(tmp_path_factory.mktemp("robust"))


def test_switch_off_batches_unchanged_and_teacher_views_identical(recipe_path):
    off = _first_batch(load_recipe(recipe_path))
    on = _first_batch(load_recipe(recipe_path, ["data.robust_views={p: 1.0, hed: [0.1, 0.2], jpeg: [30, 60]}"]))
    assert set(off) == {"global", "local", "masks", "skipped"}  # no new keys when the switch is off
    for key in ("global", "local", "masks"):  # every draw made before the perturbation is the same
        assert torch.equal(off[key], on[key]), key
    assert on["student_global"].shape == on["global"].shape
    assert not torch.equal(on["student_global"], on["global"])  # the student's copy is perturbed
    strengths = on["robust"]
    assert strengths.shape == (on["global"].shape[0], len(ORDER))
    hed, jpeg = strengths[:, ORDER.index("hed")], strengths[:, ORDER.index("jpeg")]
    assert ((hed >= 0.1 - 1e-6) & (hed <= 0.2 + 1e-6)).all() and ((jpeg >= 40) & (jpeg <= 70)).all()
    assert (strengths[:, ORDER.index("blur")] == 0).all()  # not configured -> never applied


def _best_shift(a: torch.Tensor, b: torch.Tensor, radius: int = 3) -> tuple[int, int]:
    """The integer (dy, dx) maximising the correlation of the two images' luminance (edges cropped)."""
    la, lb = a.mean(0), b.mean(0)
    r = radius
    core = la[r:-r, r:-r] - la[r:-r, r:-r].mean()
    best, arg = -math.inf, (0, 0)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            win = lb[r + dy : lb.shape[0] - r + dy, r + dx : lb.shape[1] - r + dx]
            score = float((core * (win - win.mean())).sum() / (core.norm() * (win - win.mean()).norm() + 1e-12))
            if score > best:
                best, arg = score, (dy, dx)
    return arg


@pytest.fixture(scope="module")
def textured_tiles(tmp_path_factory):
    """Tiles of per-pixel noise in H&E-like colours: any misalignment shows as a shifted correlation peak."""
    folder = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(0)
    for i in range(8):
        pink = np.array([0.85, 0.55, 0.75]) * rng.uniform(0.4, 1.0, (80, 80, 1)) + rng.uniform(0, 0.15, (80, 80, 3))
        Image.fromarray((pink.clip(0, 1) * 255).astype("uint8")).save(folder / f"t{i}.png")
    return folder


@pytest.mark.parametrize("kind", ORDER)
def test_student_view_is_pixel_aligned_with_the_teacher_view(recipe_path, textured_tiles, kind):
    lo, hi = DEFAULT_RANGES[kind]
    overrides = [f"data.train={textured_tiles}", f"data.robust_views={{p: 1.0, {kind}: [{hi}, {hi}]}}"]
    batch = _first_batch(load_recipe(recipe_path, overrides))
    for clean, perturbed in zip(batch["global"], batch["student_global"], strict=True):
        assert _best_shift(clean, perturbed) == (0, 0)
        assert not torch.equal(clean, perturbed)


def test_identity_perturbation_gives_the_teacher_view_exactly(recipe_path):
    batch = _first_batch(load_recipe(recipe_path, ["data.robust_views={p: 1.0, gain: [1.0, 1.0]}"]))
    assert torch.equal(batch["student_global"], batch["global"])


def test_student_reads_the_perturbed_views_and_training_logs_strengths(recipe_path, tmp_path):
    from multiteach.train import train

    recipe = load_recipe(
        recipe_path,
        [
            "data.robust_views={}",
            "losses.inv={type: invariance, weight: 0.5}",
            f"output_dir={tmp_path / 'run'}",
            "schedule.steps=2",
            "train.log_every=1",
        ],
    )
    run_dir = train(recipe)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["inv"]) and r["inv"] > 0 for r in records)
    for name in ORDER:
        assert 0.0 <= records[-1][f"robust_{name}_frac"] <= 1.0
    assert any(records[-1][f"robust_{name}"] > 0 for name in ORDER)


def test_model_feeds_student_the_perturbed_copy_and_targets_the_clean_one(recipe_path):
    overrides = ["data.robust_views={}", "losses.inv={type: invariance}", "losses.dino.weight=0"]
    overrides.append("losses.ibot.weight=0")
    recipe = load_recipe(recipe_path, overrides)
    comps = build_components(recipe)
    model = comps.model.eval()
    clean = torch.rand(4, 3, 64, 64)
    perturbed = torch.rand(4, 3, 64, 64)
    seen = []
    original = model.embed
    model.embed = lambda x, masks=None: (seen.append(x), original(x, masks))[1]
    teachers = {n: t(clean).as_target() for n, t in comps.teachers.items()}
    with torch.no_grad():
        batch = {"global": clean, "student_global": perturbed, "local": None, "masks": None}
        model(batch, teachers, 2, 0.04)
    # the live student on the perturbed copy, then its no-grad clean pass for the invariance term
    assert len(seen) == 2 and seen[0] is perturbed and seen[1] is clean


def test_invariance_term_is_zero_for_identical_views_and_needs_robust_views():
    out = TeacherOutput(summary=torch.randn(4, 8), patch_tokens=torch.randn(4, 9, 8), grid=(3, 3))
    term = InvarianceTerm("inv", 1.0)
    assert float(term(LossContext(student_global=out, student_clean=out))) == pytest.approx(0.0, abs=1e-6)
    other = TeacherOutput(summary=-out.summary, patch_tokens=out.patch_tokens, grid=(3, 3))
    assert float(term(LossContext(student_global=out, student_clean=other))) == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(MultiteachError, match="needs data.robust_views"):
        term(LossContext(student_global=out))


def test_heldout_severities_lie_outside_the_training_ranges():
    ranges = {"hed": (0.05, 0.2), "gamma": (0.8, 1.25), "gain": (0.92, 1.08), "blur": (0.2, 1.2), "jpeg": (40, 95)}
    levels = heldout_levels(ranges)
    strengths = {name.split("@")[0]: p.strengths() for name, p in levels.items()}
    assert strengths["hed"]["hed"] > 0.2
    assert strengths["gamma"]["gamma"] > math.log(1.25)
    assert strengths["gain"]["gain"] > math.log(1.08)
    assert strengths["blur"]["blur"] > 1.2
    assert strengths["jpeg"]["jpeg"] > 100 - 40  # quality below the lowest trained
    trained = RobustViews(ranges, p=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        s = trained.sample(g).strengths()
        assert s["hed"] <= 0.2 + 1e-9 and s["gamma"] <= math.log(1.25) + 1e-9 and s["blur"] <= 1.2 + 1e-9
    with pytest.raises(MultiteachError, match="factor must be > 1"):
        heldout_levels(ranges, factor=1.0)
    assert len(heldout_suite(ranges)) == 3 * len(ORDER)  # every kind at 1.25x, 1.5x and 2x beyond its range
    x = torch.rand(2, 3, 32, 32)
    for p in levels.values():
        y = p.apply(x)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.robust_views.hde=[0.1,0.2]", r"data.robust_views.hde: unknown perturbation. Did you mean: hed\?"),
        ("data.robust_views.hed=[0.3,0.2]", r"data.robust_views.hed: \[low, high\] must satisfy 0 <= low <= high"),
        ("data.robust_views.hed=[0.1,1.5]", r"data.robust_views.hed: .* <= 1"),
        ("data.robust_views.jpeg=[0,50]", r"data.robust_views.jpeg: .*1 <= low"),
        ("data.robust_views.gamma=[0,2]", r"data.robust_views.gamma"),
        ("data.robust_views.blur=fast", r"data.robust_views.blur: expected \[low, high\]"),
        ("data.robust_views.p=1.5", r"data.robust_views.p: must be in \[0, 1\]"),
        ("data.robust_views.rotate=[0,90]", r"data.robust_views.rotate: a geometric perturbation cannot keep"),
        ("losses.inv={type: invariance}", r"losses.inv: type 'invariance' .* needs data.robust_views"),
        ("student.init_from=unii", r"student.init_from: teacher 'unii' is not configured.*Did you mean: uni\?"),
        ("student.init_blocks=[0,1]", r"student.init_blocks: needs student.init_from"),
    ],
)
def test_bad_robust_and_init_settings_fail_at_config_time(recipe_path, override, message):
    with pytest.raises(MultiteachError, match=message):
        load_recipe(recipe_path, [override])


def test_robust_views_off_by_default_and_default_ranges(recipe_path):
    assert robust_views(load_recipe(recipe_path)) is None
    sampler = robust_views(load_recipe(recipe_path, ["data.robust_views={}"]))
    assert sampler.ranges == {k: (float(a), float(b)) for k, (a, b) in DEFAULT_RANGES.items()} and sampler.p == 0.5
    assert Perturbation().apply(torch.ones(3, 4, 4)).eq(1).all()


def test_init_from_teacher_copies_a_spread_of_blocks():
    teacher = build_student("vit_tiny_patch16_224", img_size=64, depth=6).model
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=3)
    assert spread_blocks(12, 5) == [0, 3, 6, 8, 11] and spread_blocks(6, 3) == [0, 2, 5]
    blocks = init_from_teacher(student, teacher)
    assert blocks == [0, 2, 5]
    t_sd, s_sd = teacher.state_dict(), student.model.state_dict()
    for i, b in enumerate(blocks):
        assert torch.equal(s_sd[f"blocks.{i}.attn.qkv.weight"], t_sd[f"blocks.{b}.attn.qkv.weight"])
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight"):
        assert torch.equal(s_sd[key], t_sd[key])
    smaller = build_student("vit_tiny_patch16_224", img_size=32, depth=3)  # another input size: grid resampled
    init_from_teacher(smaller, teacher)
    assert smaller.model.pos_embed.shape == (1, 1 + 2 * 2, 192)
    narrow = build_student("vit_tiny_patch16_224", img_size=64, depth=3, embed_dim=96, num_heads=3)
    with pytest.raises(MultiteachError, match=r"cls_token is \(1, 1, 96\) in the student but .*\(1, 1, 192\)"):
        init_from_teacher(narrow, teacher)
    with pytest.raises(MultiteachError, match=r"student.init_blocks: one index in \[0, 5\] per student block \(3\)"):
        init_from_teacher(student, teacher, [0, 1, 9])


def test_init_from_teacher_prunes_a_narrower_mlp_to_its_most_important_units():
    torch.manual_seed(0)
    teacher = build_student("vit_tiny_patch16_224", img_size=32, depth=2).model
    with torch.no_grad():  # make units 5 and 700 of block 1 the two largest by ||fc1 row|| * ||fc2 column||
        teacher.blocks[1].mlp.fc1.weight[[5, 700]] *= 10
    student = build_student("vit_tiny_patch16_224", img_size=32, depth=2, mlp_ratio=0.25)  # 768 -> 48 units
    init_from_teacher(student, teacher)
    t, s = teacher.blocks[1].mlp, student.model.blocks[1].mlp
    importance = t.fc1.weight.norm(dim=1) * t.fc2.weight.norm(dim=0)
    keep = importance.topk(48).indices.sort().values
    assert {5, 700} <= set(keep.tolist())
    assert torch.equal(s.fc1.weight, t.fc1.weight[keep]) and torch.equal(s.fc1.bias, t.fc1.bias[keep])
    assert torch.equal(s.fc2.weight, t.fc2.weight[:, keep]) and torch.equal(s.fc2.bias, t.fc2.bias)
    x = torch.randn(2, 3, 32, 32)
    full = student.model.forward_features(x)
    with torch.no_grad():  # the student computes exactly the teacher with the other units silenced
        pruned_teacher = build_student("vit_tiny_patch16_224", img_size=32, depth=2).model
        pruned_teacher.load_state_dict(teacher.state_dict())
        for blk in pruned_teacher.blocks:
            imp = blk.mlp.fc1.weight.norm(dim=1) * blk.mlp.fc2.weight.norm(dim=0)
            drop = imp.topk(768 - 48, largest=False).indices
            blk.mlp.fc2.weight[:, drop] = 0
    assert torch.allclose(full, pruned_teacher.forward_features(x), atol=1e-5)
    wider = build_student("vit_tiny_patch16_224", img_size=32, depth=2, mlp_ratio=5)
    with pytest.raises(MultiteachError, match=r"an MLP hidden width no larger than the teacher's"):
        init_from_teacher(wider, teacher)


def _identity_heads(teacher, target, x):
    return x


def test_feature_term_student_view_distils_into_the_clean_the_perturbed_or_both_views():
    from multiteach.losses.terms import MixedTerm

    torch.manual_seed(0)
    teacher = TeacherOutput(summary=torch.randn(4, 8), patch_tokens=torch.randn(4, 9, 8), grid=(3, 3))
    perturbed = TeacherOutput(summary=torch.randn(4, 8), patch_tokens=torch.randn(4, 9, 8), grid=(3, 3))
    clean = TeacherOutput(summary=teacher.summary.clone(), patch_tokens=teacher.patch_tokens.clone(), grid=(3, 3))
    ctx = LossContext(student_global=perturbed, teachers={"t": teacher}, student_clean=clean, heads=_identity_heads)
    for on in ("summary", "patch"):
        value = {v: float(MixedTerm("x", 1.0, "t", on=on, student_view=v)(ctx)) for v in ("perturbed", "clean", "both")}
        assert value["clean"] == pytest.approx(0.0, abs=1e-6) and value["perturbed"] > 0.5
        assert value["both"] == pytest.approx((value["perturbed"] + value["clean"]) / 2)
    assert MixedTerm("x", 1.0, "t", student_view="both").clean_student_grad
    assert not MixedTerm("x", 1.0, "t").needs_clean_student
    with pytest.raises(MultiteachError, match=r"losses.x.student_view: 'both' needs data.robust_views"):
        MixedTerm("x", 1.0, "t", student_view="both")(LossContext(student_global=perturbed, teachers={"t": teacher}))
    with pytest.raises(MultiteachError, match=r"losses.x.student_view: 'clen' is not allowed.*Allowed: perturbed"):
        MixedTerm("x", 1.0, "t", student_view="clen")


def test_student_view_both_trains_through_the_clean_pass(recipe_path):
    overrides = ["data.robust_views={}", "losses.uni.cls.student_view=both", "losses.dino.weight=0"]
    recipe = load_recipe(recipe_path, [*overrides, "losses.ibot.weight=0"])
    comps = build_components(recipe)
    model = comps.model.train()
    clean, perturbed = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    seen = []
    original = model.embed
    model.embed = lambda x, masks=None: (seen.append((x, torch.is_grad_enabled())), original(x, masks))[1]
    with torch.no_grad():
        teachers = {n: t(clean).as_target() for n, t in comps.teachers.items()}
    loss, _ = model({"global": clean, "student_global": perturbed, "local": None, "masks": None}, teachers, 2, 0.04)
    assert len(seen) == 2 and seen[0][0] is perturbed and seen[1][0] is clean
    assert seen[1][1], "the clean pass must keep gradients when a distillation term reads it"
    loss.backward()
    assert model.student.model.patch_embed.proj.weight.grad is not None
    with pytest.raises(MultiteachError, match=r"losses.uni.cls.student_view: 'both' .* needs data.robust_views"):
        load_recipe(recipe_path, ["losses.uni.cls.student_view=both"])


def test_robust_views_p_per_perturbation():
    views = RobustViews({"hed": (0.05, 0.2), "blur": (0.2, 1.2), "jpeg": (40, 95)}, p={"hed": 1.0, "blur": 0.0})
    assert views.p == {"hed": 1.0, "blur": 0.0, "jpeg": 0.5}
    g = torch.Generator().manual_seed(0)
    drawn = [views.sample(g) for _ in range(100)]
    assert all(d.hed is not None and d.blur is None for d in drawn)
    assert 20 < sum(d.jpeg is not None for d in drawn) < 80
    with pytest.raises(MultiteachError, match=r"data.robust_views.p.gamma: .*not configured"):
        RobustViews({"hed": (0.05, 0.2)}, p={"gamma": 0.5})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.robust_views={hed: [0.05, 0.2], p: {blur: 0.2}}", r"data.robust_views.p.blur: .*not configured"),
        ("data.robust_views={hed: [0.05, 0.2], p: {hed: 2}}", r"data.robust_views.p.hed: must be in \[0, 1\]"),
    ],
)
def test_bad_per_perturbation_p_fails_at_config_time(recipe_path, override, message):
    with pytest.raises(MultiteachError, match=message):
        load_recipe(recipe_path, [override])
    assert load_recipe(recipe_path, ["data.robust_views={hed: [0.05, 0.2], p: {hed: 0.25}}"]).data.robust_views[
        "p"
    ] == {"hed": 0.25}
