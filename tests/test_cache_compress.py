"""Storage codecs for cached teacher targets: precision codecs, patch PCA, fidelity and byte accounting."""

from __future__ import annotations

import pytest
import torch

from multiteach.cache.compress import (
    STORE_CODECS,
    PatchPCA,
    bytes_per_row,
    canonical_dtype,
    cosine_fidelity,
    decode_tokens,
    encode_tokens,
    load_parts,
    part_names,
    store_parts,
)
from multiteach.errors import MultiteachError


def _tokens(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# --- dtype names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "want"),
    [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"), ("BF16", "bfloat16"), ("int8", "int8")],
)
def test_canonical_dtype_aliases(name, want):
    assert canonical_dtype(name) == want
    assert canonical_dtype(want) == want


def test_canonical_dtype_typo_lists_allowed_and_close_match():
    with pytest.raises(MultiteachError) as err:
        canonical_dtype("bfloat61")
    msg = str(err.value)
    assert "cache.dtype" in msg and "'bfloat61'" in msg
    assert all(c in msg for c in STORE_CODECS)
    assert "Did you mean: bfloat16" in msg
    with pytest.raises(MultiteachError, match="Did you mean: int8"):
        canonical_dtype("int6")


# --- precision round trips ---------------------------------------------------------------------------------------


def test_float32_round_trip_is_exact():
    x = _tokens(2, 5, 16)
    parts = encode_tokens(x, "fp32")
    assert set(parts) == {""} and parts[""].dtype == torch.float32
    assert torch.equal(decode_tokens(parts, "float32"), x)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "rel"), [("bf16", torch.bfloat16, 2**-8), ("fp16", torch.float16, 2**-11)]
)
def test_half_round_trip_relative_error(dtype, torch_dtype, rel):
    x = _tokens(3, 7, 32)
    parts = encode_tokens(x, dtype)
    assert parts[""].dtype == torch_dtype and parts[""].shape == x.shape
    y = decode_tokens(parts, dtype)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert bool(((y - x).abs() <= x.abs() * rel + 1e-6).all())
    assert not torch.equal(y, x)  # really rounded


def test_int8_parts_shapes_and_dtypes():
    x = _tokens(4, 9, 24)
    parts = encode_tokens(x, "int8")
    assert set(parts) == {"", "scale"}
    assert parts[""].dtype == torch.int8 and parts[""].shape == (4, 9, 24)
    assert parts["scale"].dtype == torch.float16 and parts["scale"].shape == (4, 9, 1)
    assert int(parts[""].abs().max()) <= 127
    # Each token uses (nearly) the full range: its largest entry maps to +-127.
    assert bool((parts[""].abs().amax(-1) == 127).all())


@pytest.mark.parametrize("magnitude", [1e-5, 1e-2, 3.0, 5e4])
def test_int8_error_within_half_a_step(magnitude):
    x = _tokens(6, 40, scale=magnitude, seed=1)
    x[0] *= 1e-3  # tokens of very different magnitude quantise independently
    parts = encode_tokens(x, "int8")
    y = decode_tokens(parts, "int8")
    scale = parts["scale"].float()
    err = (y - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-4)).all())
    assert bool((scale >= x.abs().amax(-1, keepdim=True) / 127).all())  # scale rounded up: nothing clips


@pytest.mark.parametrize("magnitude", [0.01, 3.0, 5e4])
def test_int8_fidelity_in_float16_normal_range(magnitude):
    # absmax >= 127 * 2**-14 (about 7.8e-3): float16 scales are normal numbers, steps within 0.1% of absmax/127.
    x = _tokens(6, 40, scale=magnitude, seed=2)
    parts = encode_tokens(x, "int8")
    ideal = x.abs().amax(-1, keepdim=True) / 127
    assert bool((parts["scale"].float() <= ideal * (1 + 2**-10)).all())
    assert cosine_fidelity(x, decode_tokens(parts, "int8")) > 0.999


def test_int8_zero_token_gets_scale_one():
    x = _tokens(3, 8)
    x[1] = 0
    parts = encode_tokens(x, "int8")
    assert float(parts["scale"][1]) == 1.0
    assert not bool(parts[""][1].any())
    y = decode_tokens(parts, "int8")
    assert torch.isfinite(y).all() and not bool(y[1].any())


def test_fp16_overflow_refused_suggesting_bfloat16():
    x = _tokens(2, 8)
    x[1, 3] = 70000.0
    with pytest.raises(MultiteachError, match="bfloat16") as err:
        encode_tokens(x, "float16", name="uni.patch")
    assert "uni.patch" in str(err.value) and "65504" in str(err.value)
    assert encode_tokens(x, "bf16")[""].isfinite().all()


def test_non_finite_input_refused():
    x = _tokens(2, 8)
    x[0, 0] = float("nan")
    for dtype in STORE_CODECS:
        with pytest.raises(MultiteachError, match="NaN"):
            encode_tokens(x, dtype)


def test_int8_scale_overflow_refused():
    with pytest.raises(MultiteachError, match="float16 scale"):
        encode_tokens(torch.full((1, 4), 1e7), "int8")


def test_decode_checks_parts():
    parts = encode_tokens(_tokens(2, 8), "int8")
    with pytest.raises(MultiteachError, match="scale"):
        decode_tokens({"": parts[""]}, "int8")
    with pytest.raises(MultiteachError, match="not int8"):
        decode_tokens({"": parts[""].float(), "scale": parts["scale"]}, "int8")
    with pytest.raises(MultiteachError, match="wrong cache dtype"):
        decode_tokens({"": parts[""]}, "bfloat16")


def test_part_naming_round_trip():
    x = _tokens(2, 3, 8)
    stored = store_parts("uni.patch", encode_tokens(x, "int8"))
    assert set(stored) == {"uni.patch", "uni.patch.scale"}
    assert part_names("bf16") == ("",) and part_names("int8") == ("", "scale")
    y = decode_tokens(load_parts(stored, "uni.patch", "int8"), "int8")
    assert y.shape == x.shape
    with pytest.raises(MultiteachError, match="uni.patch.scale"):
        load_parts({"uni.patch": stored["uni.patch"]}, "uni.patch", "int8")


# --- PCA ---------------------------------------------------------------------------------------------------------


def test_pca_full_rank_reconstructs():
    x = _tokens(200, 16)
    pca = PatchPCA.fit(x, 16)
    z = pca.encode(x)
    assert z.shape == (200, 16) and z.dtype == torch.float32
    assert torch.allclose(pca.decode(z), x, atol=1e-5 * float(x.abs().max()))
    assert pca.explained == pytest.approx(1.0)


def test_pca_low_rank_exact_but_random_full_rank_not():
    g = torch.Generator().manual_seed(3)
    r, k, d = 3, 4, 24
    low = torch.randn(10, 30, r, generator=g) @ torch.randn(r, d, generator=g) + torch.randn(d, generator=g)
    pca = PatchPCA.fit(low, k)  # (T, N, D) of tiles
    z = pca.encode(low)
    assert z.shape == (10, 30, k)
    rec = pca.decode(z)
    assert rec.shape == low.shape
    assert float((rec - low).abs().max()) < 1e-4 * float(low.abs().max())
    assert pca.explained == pytest.approx(1.0, abs=1e-6)

    full = _tokens(300, d, seed=4)
    pca_full = PatchPCA.fit(full, k)
    rel = float((pca_full.decode(pca_full.encode(full)) - full).norm() / (full - full.mean(0)).norm())
    assert rel > 0.5
    assert 0.0 < pca_full.explained < 0.5
    assert cosine_fidelity(full, pca_full.decode(pca_full.encode(full))) < 0.9


def test_pca_components_orthonormal_sorted_and_signed():
    x = _tokens(120, 12, seed=5) * torch.linspace(0.1, 3.0, 12)
    pca = PatchPCA.fit(x, 5)
    c = pca.components.double()
    assert torch.allclose(c @ c.T, torch.eye(5, dtype=torch.float64), atol=1e-6)
    var = pca.encode(x).var(0)
    assert bool((var[:-1] >= var[1:]).all())
    peak = c.abs().argmax(1, keepdim=True)
    assert bool((c.gather(1, peak) > 0).all())


def test_pca_fit_is_deterministic():
    x = _tokens(150, 20, seed=6)
    a, b = PatchPCA.fit(x, 6), PatchPCA.fit(x.clone(), 6)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.components, b.components)
    assert a.explained == b.explained


def test_pca_tensors_round_trip():
    x = _tokens(80, 10, seed=7)
    pca = PatchPCA.fit(x, 4)
    tensors = pca.to_tensors()
    assert set(tensors) == {"mean", "components"}
    assert tensors["mean"].shape == (10,) and tensors["components"].shape == (4, 10)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    again = PatchPCA.from_tensors(tensors, explained=pca.explained)
    assert again.k == 4 and again.dim == 10 and again.explained == pca.explained
    assert torch.equal(again.encode(x), pca.encode(x))
    assert torch.equal(again.decode(pca.encode(x)), pca.decode(pca.encode(x)))
    with pytest.raises(MultiteachError, match="components"):
        PatchPCA.from_tensors({"mean": tensors["mean"]})


@pytest.mark.parametrize("k", [0, 11, -1])
def test_pca_bad_k_names_key_and_range(k):
    with pytest.raises(MultiteachError) as err:
        PatchPCA.fit(_tokens(50, 10), k)
    msg = str(err.value)
    assert "cache.patch_dims" in msg and str(k) in msg and "1 <= cache.patch_dims <= 10" in msg


def test_pca_too_few_rows_says_how_many_tiles():
    with pytest.raises(MultiteachError, match=r"cache.patch_dims = 8.*at least 2 tiles of 5 tokens"):
        PatchPCA.fit(_tokens(1, 5, 16), 8)
    with pytest.raises(MultiteachError, match=r"at least 8 token rows.*got 3 rows"):
        PatchPCA.fit(_tokens(3, 16), 8)


def test_pca_shape_mismatch():
    pca = PatchPCA.fit(_tokens(30, 8), 3)
    with pytest.raises(MultiteachError, match=r"\(\.\.\., 8\)"):
        pca.encode(_tokens(2, 9))
    with pytest.raises(MultiteachError, match=r"\(\.\.\., 3\)"):
        pca.decode(_tokens(2, 8))


# --- fidelity and bytes ------------------------------------------------------------------------------------------


def test_cosine_fidelity():
    a = _tokens(4, 6, 8)
    assert cosine_fidelity(a, a) == pytest.approx(1.0)
    assert cosine_fidelity(a, -a) == pytest.approx(-1.0)
    assert cosine_fidelity(a, 2.5 * a) == pytest.approx(1.0)
    b = a.clone()
    b[0] = -b[0]  # a quarter of the rows flipped
    assert cosine_fidelity(a, b) == pytest.approx(0.5)
    z = torch.zeros(3, 8)
    assert cosine_fidelity(z, z) == pytest.approx(1.0)
    with pytest.raises(MultiteachError, match="shapes"):
        cosine_fidelity(a, a[..., :4])


def test_bytes_per_row_known_cases():
    assert bytes_per_row("int8", 196, 384) == 196 * (384 + 2)
    assert bytes_per_row("bf16", 196, 384) == 196 * 384 * 2
    assert bytes_per_row("float16", 196, 384) == 196 * 384 * 2
    assert bytes_per_row("fp32", 196, 384) == 196 * 384 * 4
    assert bytes_per_row("int8", 1, 1536) == 1538
    # The accounting matches what encode_tokens actually produces.
    for dtype in STORE_CODECS:
        parts = encode_tokens(_tokens(1, 7, 12), dtype)
        stored = sum(t.numel() * t.element_size() for t in parts.values())
        assert stored == bytes_per_row(dtype, 7, 12)
    with pytest.raises(MultiteachError, match="n_tokens"):
        bytes_per_row("int8", 0, 384)
    with pytest.raises(MultiteachError, match="Did you mean"):
        bytes_per_row("int9", 1, 384)
