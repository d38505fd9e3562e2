"""Provenance and licences of the catalog: every entry says what it was checked against; every unchecked fact
says why; licences are one source of truth from which the non-commercial flag, the README table and the
model card's licence table and paragraph are derived."""

import json
import re
from types import SimpleNamespace

import pytest

from multiteach.cli import main
from multiteach.errors import MultiteachError
from multiteach.publish import card_license, teacher_rows
from multiteach.teachers import CATALOG, resolve_spec
from multiteach.teachers.base import TeacherSpec
from multiteach.teachers.describe import unverified_facts
from multiteach.teachers.licences import LICENCES, licence_terms

REPO_REF = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{12,40}:\S+$")
FACTS = {
    "architecture kwargs",
    "token layout",
    "embedding rule",
    "preprocessing",
    "checkpoint key layout",
    "licence",
    "gating",
    "revision",
}
# Before issue 14: 2 "[unverified]" notes (conch-v1.5 layout, GPFM format), 4 licences "not checked"
# (h-optimus-1, hibou-b, hibou-l, kaiko-vitb8), 1 inferred fact (H0-mini's mlp_ratio).
UNVERIFIED_BEFORE = 7


@pytest.fixture(scope="module")
def catalog_json():
    """`multiteach teachers --json`, parsed (parameter counts on the meta device: a few seconds)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["teachers", "--json"]) == 0
    return {row["name"]: row for row in json.loads(buf.getvalue())}


def test_teachers_json_carries_verified_against_for_every_entry(catalog_json):
    assert set(catalog_json) == set(CATALOG.keys())
    for name, row in catalog_json.items():
        refs = row["verified_against"]
        assert refs, f"{name}: no verified_against"
        for ref in refs:
            # owner/repo@commit:path of public code read, or a quote of a Hub card / paper / this repository
            assert (
                REPO_REF.match(ref) or "quote" in ref or ref.startswith(("huggingface.co/", "H0-mini paper", "this "))
            )
        assert set(row["checked"]) <= FACTS and row["checked"], name


def test_unverified_facts_went_down_and_each_says_why(catalog_json):
    facts = unverified_facts()
    count = sum(len(v) for v in facts.values())
    assert count < UNVERIFIED_BEFORE
    for name, items in facts.items():
        for fact in items:
            what, _, why = fact.partition(":")
            assert what and len(why.strip()) > 40, f"{name}: {fact!r} does not say why"
        assert catalog_json[name]["unverified"] == [f"[unverified: {f}]" for f in items]
    assert not any("[unverified" in CATALOG.get(n).notes for n in CATALOG)  # no unstructured leftovers


def test_every_entry_licence_and_flag_agree():
    for name in CATALOG:
        spec = CATALOG.get(name)
        terms = licence_terms(spec.license)
        assert terms is not None, f"{name}: licence {spec.license!r} is not in LICENCES"
        assert spec.noncommercial_derivatives == terms.restricts_student, name
        if terms.noncommercial or terms.no_derivatives:  # any NC/ND licence => derivatives non-commercial
            assert spec.noncommercial_derivatives, name
    # the case a user met: virchow2 and uni share a licence, so they share the flag
    assert CATALOG.get("virchow2").noncommercial_derivatives and CATALOG.get("uni").noncommercial_derivatives


def test_an_entry_cannot_contradict_its_licence():
    with pytest.raises(MultiteachError, match=r"'bad'.*CC-BY-NC-ND-4.0.*cannot be False"):
        TeacherSpec(
            name="bad",
            loader="timm",
            hub_id=None,
            arch="vit_tiny_patch16_224",
            embed_dim=192,
            patch_size=16,
            num_prefix_tokens=1,
            license="CC-BY-NC-ND-4.0",
            noncommercial_derivatives=False,
        )
    assert resolve_spec("hf-hub:someone/model").noncommercial_derivatives is False  # unknown: the card asks


def _recipe_of(*names):
    teachers = {n: SimpleNamespace(source=n, weights=None) for n in names}
    losses = {f"{n}.cls": {"type": "cosine", "teacher": n} for n in names}
    return SimpleNamespace(teachers=teachers, active_losses=lambda: losses)


def test_card_paragraph_names_every_restricting_teacher():
    rows = teacher_rows(_recipe_of(*CATALOG.keys()))
    front, lines = card_license(rows)
    paragraph = lines[0]
    assert paragraph.startswith("> **Non-commercial use only.**") and "may not be used commercially" in paragraph
    for row in rows:
        named = f"{row['name']} ({row['license']}:" in paragraph
        assert named == CATALOG.get(row["name"]).noncommercial_derivatives, row["name"]
    assert front == {"license": "other", "license_name": "noncommercial-derivative"}  # NC terms differ


def test_card_for_uni_and_virchow2_names_both():
    front, lines = card_license(teacher_rows(_recipe_of("uni", "virchow2")))
    assert front == {"license": "cc-by-nc-nd-4.0"}
    assert "uni (CC-BY-NC-ND-4.0:" in lines[0] and "virchow2 (CC-BY-NC-ND-4.0:" in lines[0]
    assert "Gated teacher(s): uni, virchow2" in lines[-1]


def test_card_permissive_teachers_and_their_extra_terms():
    front, lines = card_license(teacher_rows(_recipe_of("h-optimus-0", "prov-gigapath")))
    assert front == {"license": "apache-2.0"}
    assert not any("Non-commercial" in line for line in lines)
    assert any(
        "prov-gigapath: the README says the checkpoints are intended for research use only" in line for line in lines
    )


def test_readme_licence_column_comes_from_the_catalog():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = table.split("<!-- teachers-table:start -->")[1].split("<!-- teachers-table:end -->")[0]
    for name in CATALOG:
        spec = CATALOG.get(name)
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {spec.license} |" in row
        assert row.rstrip().endswith("| non-commercial |" if spec.noncommercial_derivatives else "| — |"), row
    assert set(LICENCES) >= {CATALOG.get(n).license for n in CATALOG}
