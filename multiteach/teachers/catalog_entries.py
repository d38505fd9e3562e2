"""The table of named teachers: one short :class:`TeacherSpec` per model, facts from its card and public code.

:mod:`multiteach.teachers.catalog` registers these entries, in this order, as :data:`CATALOG`; to add a
teacher, add one ``TeacherSpec(...)`` block to :data:`ENTRIES`. How an entry records its provenance
(``verified_against``, ``checked``, ``unverified``) and its licence is described in that module; the
references and fact labels it cites are in :mod:`multiteach.teachers.catalog_refs`.
"""

from __future__ import annotations

from multiteach.teachers import catalog_refs as ref
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TeacherSpec
from multiteach.teachers.licences import APACHE, CC_BY_NC_ND
from multiteach.teachers.shipped import shipped_dir

__all__ = ["ENTRIES", "SWIGLU"]

# timm model kwargs shared by several entries: SwiGLU MLPs (packed), then per family.
SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_HOPT = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.33334, **SWIGLU, "no_embed_class": True}
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **SWIGLU}
_HIBOU = {"patch_size": 14, "image_size": 224, "num_register_tokens": 4, "use_swiglu_ffn": True}

ENTRIES: tuple[TeacherSpec, ...] = (
    TeacherSpec(
        name="uni",
        loader="timm",
        hub_id="MahmoodLab/uni",
        arch="vit_large_patch16_224",
        model_kwargs={"img_size": 224, "init_values": 1e-5},
        embed_dim=1024,
        patch_size=16,
        num_prefix_tokens=1,
        interpolation="bilinear",
        license=CC_BY_NC_ND,
        gated=True,
        url="https://huggingface.co/MahmoodLab/UNI",
        verified_against=(ref.UNI_README, ref.TRIDENT, ref.PLISM.format("mahmood_lab")),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
        notes="Preprocessing on the card: Resize(224) (bilinear) + CenterCrop(224), ImageNet mean/std.",
    ),
    TeacherSpec(
        name="uni2-h",
        loader="timm",
        hub_id="MahmoodLab/UNI2-h",
        arch="vit_giant_patch14_224",
        model_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            **SWIGLU,
            "reg_tokens": 8,
            "no_embed_class": True,
            "init_values": 1e-5,
        },
        embed_dim=1536,
        patch_size=14,
        num_prefix_tokens=9,
        interpolation="bilinear",
        license=CC_BY_NC_ND,
        gated=True,
        url="https://huggingface.co/MahmoodLab/UNI2-h",
        verified_against=(ref.UNI_README, ref.TRIDENT, ref.PLISM.format("mahmood_lab")),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
    ),
    TeacherSpec(
        name="conch",
        loader="conch",
        hub_id="MahmoodLab/CONCH",
        arch="conch_ViT-B-16",
        embed_dim=768,
        patch_size=16,
        num_prefix_tokens=1,
        input_size=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        embedding="pooled",
        summary_dim=512,
        license=CC_BY_NC_ND,
        gated=True,
        url="https://huggingface.co/MahmoodLab/CONCH",
        verified_against=(
            ref.CONCH.format("README.md"),
            ref.CONCH.format("conch/open_clip_custom/model_configs/conch_ViT-B-16.json"),
            ref.CONCH.format("conch/open_clip_custom/factory.py"),
            ref.CONCH.format("conch/open_clip_custom/vision_tower.py"),
            ref.TRIDENT,
            ref.PLISM.format("mahmood_lab"),
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.KEYS, ref.LICENCE, ref.GATING),
        notes="Image tower of a CoCa model; summary = encode_image(proj_contrast=False, normalize=False): the "
        "attentional-pool embedding (512-d) before the contrastive projection; patches = trunk tokens (768-d). "
        "The Hub file is the full CoCa model: the text side is dropped at load. Needs the `conch` extra.",
    ),
    TeacherSpec(
        name="conch-v1.5",
        loader="conch_v15",
        hub_id="MahmoodLab/conchv1_5",
        arch="vit_large_patch16_224",
        model_kwargs={"img_size": 448, "init_values": 1.0, "pool_dim": 768, "pool_heads": 8, "pool_queries": 1},
        hub_filename="pytorch_model_vision.bin",
        embed_dim=1024,
        patch_size=16,
        num_prefix_tokens=1,
        input_size=448,
        embedding="pooled",
        summary_dim=768,
        interpolation="bilinear",
        license=CC_BY_NC_ND,
        gated=True,
        url="https://huggingface.co/MahmoodLab/conchv1_5",
        verified_against=(
            ref.TRIDENT_CONCH15,
            ref.TRIDENT,
            ref.PLISM.format("mahmood_lab"),
            "huggingface.co/MahmoodLab/conchv1_5 README (card quote): 'license: cc-by-nc-nd-4.0'; gated; "
            "'models trained on outputs from the CONCHv1_5 model' may not be used commercially",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.KEYS, ref.LICENCE, ref.GATING),
        unverified=(
            "trunk.pos_embed grid in pytorch_model_vision.bin: TRIDENT resamples whatever grid the file holds to "
            "its 224-px model and interpolates to 448 px at run time, so public code does not reveal it; this "
            "loader resamples any square grid to the 448-px model once at load (outputs differ from TRIDENT's "
            "in the last digits)",
        ),
        notes="ViT-L/16 trunk with LayerScale + one-query attentional pooler (to_q/to_kv/to_out) + LayerNorm -> "
        "768-d; not CONCH v1's CoCa layout (no proj_contrast, no text tower). Needs no extra package.",
    ),
    TeacherSpec(
        name="phikon",
        loader="transformers",
        hub_id="owkin/phikon",
        arch="ViTConfig",
        embed_dim=768,
        patch_size=16,
        num_prefix_tokens=1,
        interpolation="bilinear",
        license="Owkin non-commercial",
        url="https://huggingface.co/owkin/phikon",
        verified_against=(
            ref.TRIDENT,
            ref.PLISM.format("owkin"),
            "huggingface.co/owkin/phikon@ce090f5c6efa README (card quote): 'License: Owkin non-commercial "
            "license'; no access gate",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
    ),
    TeacherSpec(
        name="phikon-v2",
        loader="transformers",
        hub_id="owkin/phikon-v2",
        arch="Dinov2Config",
        model_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 16,
            "image_size": 224,
        },
        embed_dim=1024,
        patch_size=16,
        num_prefix_tokens=1,
        interpolation="bilinear",
        license="Owkin non-commercial",
        url="https://huggingface.co/owkin/phikon-v2",
        verified_against=(
            ref.TRIDENT,
            ref.PLISM.format("owkin"),
            "huggingface.co/owkin/phikon-v2@419e8285b80e README (card quote): 'ViT-L/16 via DINOv2'; "
            "'License: Owkin non-commercial licence'; no access gate",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
        unverified=(
            "config.json details (image_size 224, MLP FFN): the Hub config is not quoted in any public source read "
            "here; transformers loads it itself, so only the meta parameter count and the doctor rely on them",
        ),
    ),
    TeacherSpec(
        name="h-optimus-0",
        loader="timm",
        hub_id="bioptimus/H-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        model_kwargs=_HOPT,
        embed_dim=1536,
        patch_size=14,
        num_prefix_tokens=5,
        mean=ref.HOPTIMUS_MEAN,
        std=ref.HOPTIMUS_STD,
        interpolation="bilinear",
        license=APACHE,
        url="https://huggingface.co/bioptimus/H-optimus-0",
        verified_against=(
            ref.TRIDENT,
            ref.PLISM.format("bioptimus"),
            "huggingface.co/bioptimus/H-optimus-0@d7e1f8884c29 README (card quote): 'license: apache-2.0'; no "
            "access gate",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
        notes="Native 224 px at 0.5 um/px.",
    ),
    TeacherSpec(
        name="h-optimus-1",
        loader="timm",
        hub_id="bioptimus/H-optimus-1",
        arch="vit_giant_patch14_reg4_dinov2",
        model_kwargs=_HOPT,
        embed_dim=1536,
        patch_size=14,
        num_prefix_tokens=5,
        mean=ref.HOPTIMUS_MEAN,
        std=ref.HOPTIMUS_STD,
        interpolation="bilinear",
        license="Bioptimus academic-research terms",
        gated=True,
        url="https://huggingface.co/bioptimus/H-optimus-1",
        verified_against=(
            ref.TRIDENT,
            ref.PLISM.format("bioptimus"),
            "huggingface.co/bioptimus/H-optimus-1 discussions #21: access requests pending review (gated)",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.GATING),
        unverified=(
            "licence: the gated card's licence text is not readable here; Bioptimus's announcement says the model "
            "'can be accessed for academic research purposes', so students are marked non-commercial to be safe",
        ),
    ),
    TeacherSpec(
        name="h0-mini",
        loader="timm",
        hub_id="bioptimus/H0-mini",
        arch="vit_base_patch14_reg4_dinov2",
        model_kwargs={"img_size": 224, "mlp_ratio": 5.33334, **SWIGLU},
        embed_dim=768,
        patch_size=14,
        num_prefix_tokens=5,
        mean=ref.HOPTIMUS_MEAN,
        std=ref.HOPTIMUS_STD,
        license=CC_BY_NC_ND,
        gated=True,
        url="https://huggingface.co/bioptimus/H0-mini",
        verified_against=(
            ref.TRIDENT,
            ref.PLISM.format("bioptimus"),
            "H0-mini paper (arXiv 2501.16239) Table 4: ViT-B/14, 4 registers, dim 768, 12 layers, 12 heads, MLP "
            "ratio 4 with SwiGLU (DINOv2 hidden 2048 = timm mlp_ratio 5.33334 packed); 86M parameters",
            "huggingface.co/bioptimus/H0-mini discussions: access requests (gated)",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.GATING),
        unverified=(
            "licence: the gated card is not readable here and no public code quotes it; kept CC-BY-NC-ND-4.0 as "
            "the project's notes say, which marks students non-commercial (the safe side)",
        ),
        notes="Distilled from H-optimus-0. Use embedding 'cls+mean' for the 1536-d variant (TRIDENT's cls+mean).",
    ),
    TeacherSpec(
        name="virchow",
        loader="timm",
        hub_id="paige-ai/Virchow",
        arch="vit_huge_patch14_224",
        model_kwargs=_VIRCHOW,
        embed_dim=1280,
        patch_size=14,
        num_prefix_tokens=1,
        embedding="cls+mean",
        license="Apache-2.0 with additional terms",
        gated=True,
        url="https://huggingface.co/paige-ai/Virchow",
        verified_against=(
            ref.TRIDENT,
            ref.PLISM.format("paige_ai"),
            "huggingface.co/paige-ai/Virchow README (card quote): 'released under the Apache License, Version "
            "2.0' with 'Additional Terms' (institutional email, attribution and responsible-use requests); gated",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
    ),
    TeacherSpec(
        name="virchow2",
        loader="timm",
        hub_id="paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        model_kwargs={**_VIRCHOW, "reg_tokens": 4},
        embed_dim=1280,
        patch_size=14,
        num_prefix_tokens=5,
        embedding="cls+mean",
        license=CC_BY_NC_ND,
        gated=True,
        url="https://huggingface.co/paige-ai/Virchow2",
        verified_against=(
            ref.TRIDENT,
            ref.PLISM.format("paige_ai"),
            "huggingface.co/paige-ai/Virchow2 (card quote): 'released under the CC-BY-NC-ND 4.0 license'; "
            "'models trained on outputs from the Virchow2 Model' may not be monetised without approval; gated",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
    ),
    TeacherSpec(
        name="prov-gigapath",
        loader="timm",
        hub_id="prov-gigapath/prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        model_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
        },
        embed_dim=1536,
        patch_size=16,
        num_prefix_tokens=1,
        license="Apache-2.0 (research use)",
        gated=True,
        url="https://huggingface.co/prov-gigapath/prov-gigapath",
        verified_against=(
            ref.GIGAPATH.format("demo/3_load_tile_encoder.py"),
            ref.GIGAPATH.format("README.md"),
            ref.TRIDENT,
            ref.PLISM.format("microsoft"),
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
        notes="The card resizes to 256 (bicubic) and centre-crops 224; multiteach resizes the whole view to 224.",
    ),
    TeacherSpec(
        name="hibou-b",
        loader="transformers",
        hub_id="histai/hibou-b",
        arch="Dinov2WithRegistersConfig",
        model_kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, **_HIBOU},
        embed_dim=768,
        patch_size=14,
        num_prefix_tokens=5,
        mean=ref.HIBOU_MEAN,
        std=ref.HIBOU_STD,
        license=APACHE,
        url="https://huggingface.co/histai/hibou-b",
        revision="7fdc8cce365ebfd9e7e60ee6ee9a8d4d59388f3c",
        remote_code=True,
        verified_against=(
            "huggingface.co/histai/hibou-b@5cc6343e7d77:config.json (quoted on the Hub): auto_map to "
            "configuration_dinov2.Dinov2Config / modeling_dinov2.Dinov2ModelWithRegisters, model_type dinov2, "
            "hidden 768, 12 layers, 12 heads, patch 14, image 224, num_register_tokens 4, use_swiglu_ffn true; "
            "'License: apache-2.0'; model files unchanged up to 7fdc8cce365e",
            ref.HIBOU.format("README.md"),
            ref.HIBOU.format("hibou/models/__init__.py"),
            ref.TRIDENT,
            ref.TRIDENT_CONSTANTS,
            ref.PLISM.format("histai"),
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING, ref.REVISION),
        unverified=(
            "state-dict key names: the Hub's modeling_dinov2.py is not readable here; the doctor and the meta "
            "architecture assume transformers' Dinov2WithRegisters names (public code reads "
            "embeddings.patch_embeddings.projection)",
        ),
        notes="Loads with trust_remote_code (opt in per teacher). Summary = CLS after the final LayerNorm, which is "
        "what plismbench reads and what TRIDENT's pooler_output is for this architecture.",
    ),
    TeacherSpec(
        name="hibou-l",
        loader="transformers",
        hub_id="histai/hibou-L",
        arch="Dinov2WithRegistersConfig",
        model_kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, **_HIBOU},
        embed_dim=1024,
        patch_size=14,
        num_prefix_tokens=5,
        mean=ref.HIBOU_MEAN,
        std=ref.HIBOU_STD,
        license=APACHE,
        url="https://huggingface.co/histai/hibou-L",
        remote_code=True,
        verified_against=(
            ref.HIBOU.format("README.md"),
            ref.HIBOU.format("hibou/models/__init__.py"),
            ref.TRIDENT,
            ref.TRIDENT_CONSTANTS,
            ref.PLISM.format("histai"),
        ),
        checked=(ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING),
        unverified=(
            "Hub revision, config.json and key names: no public record of histai/hibou-L's commits or config was "
            "found, so no revision is pinned; SwiGLU FFN, 4 registers and the key names are assumed as hibou-b's "
            "(HistAI's build_model defaults)",
        ),
        notes="Loads with trust_remote_code (opt in per teacher).",
    ),
    TeacherSpec(
        name="kaiko-vitb8",
        loader="timm",
        hub_id="1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms",
        arch="vit_base_patch8_224",
        model_kwargs={"img_size": 224},
        embed_dim=768,
        patch_size=8,
        num_prefix_tokens=1,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        license="Kaiko non-commercial",
        url="https://github.com/kaiko-ai/towards_large_pathology_fms",
        revision="a4eb74de76274a5f3fe8260841a1b07a90930f43",
        verified_against=(
            ref.KAIKO.format("hubconf.py"),
            ref.KAIKO.format("README.md"),
            ref.KAIKO.format("LICENSE"),
            "huggingface.co/1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms@a4eb74de7627 "
            "(tree page): config.json + model.safetensors, 'License: kaiko-non-commercial'; no access gate",
            ref.TRIDENT,
            ref.PLISM.format("kaiko_ai"),
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE, ref.GATING, ref.REVISION),
    ),
    TeacherSpec(
        name="gpfm",
        loader="timm",
        hub_id="majiabo/GPFM",
        arch="vit_large_patch14_dinov2",
        model_kwargs={"img_size": 224, "init_values": 1e-5},
        hub_filename="GPFM.pth",
        weights_format="dinov2",
        strip_prefixes=("backbone.",),
        embed_dim=1024,
        patch_size=14,
        num_prefix_tokens=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license=CC_BY_NC_ND,
        url="https://github.com/birkhoffkiki/GPFM",
        verified_against=(
            ref.GPFM.format("models/dinov2/__init__.py"),
            ref.GPFM.format("models/dinov2/vision_transformer.py"),
            ref.GPFM.format("LICENSE"),
            ref.PLISM.format("hkust"),
            ref.TRIDENT,
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.KEYS, ref.LICENCE, ref.GATING),
        notes="Two public layouts load: the GitHub release GPFM.pth ({'teacher': {'backbone.*' DINOv2 keys with "
        "FSDP block chunks, 'dino_head.*', mask_token}}, as GPFM's and plismbench's loaders read it) and timm keys "
        "(optionally under 'state_dict', as TRIDENT loads majiabo/GPFM).",
    ),
    TeacherSpec(
        name="multiteach-tiny",
        loader="timm",
        hub_id=None,
        arch="vit_tiny_patch16_224",
        model_kwargs={"img_size": 112},
        embed_dim=192,
        patch_size=16,
        num_prefix_tokens=1,
        input_size=112,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license="Apache-2.0",
        weights=str(shipped_dir("multiteach-tiny")),
        url="multiteach/assets/teachers/multiteach-tiny/README.md",
        verified_against=(
            "this repository: multiteach/assets/teachers/multiteach-tiny (config.json, model card; trained here by "
            "the pretrain_tiny recipe; files checked against SHA256SUMS at load)",
        ),
        checked=(ref.ARCH, ref.TOKENS, ref.EMBED, ref.PREPROC, ref.LICENCE),
        notes="Shipped inside the package (fp16, no network): a ViT-Ti/16 at 112 px pretrained by multiteach's own "
        "DINO + iBOT + KoLeo recipe (`pretrain_tiny`) on real H&E tiles; the small, real teacher every machine has.",
    ),
)
