"""The named teachers: one short entry per model, facts taken from its model card.

Facts marked "[unverified]" in ``notes`` could not be checked against the public card or code.
Parameter counts are not written here: ``multiteach teachers`` computes them from the architecture
on the meta device, and the tests compare them with the published figures.
"""

from __future__ import annotations

from multiteach.registry import Registry
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TeacherSpec
from multiteach.teachers.shipped import shipped_dir

CATALOG: Registry[TeacherSpec] = Registry("teacher")

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
NC_ND = "CC-BY-NC-ND-4.0"


def _add(spec: TeacherSpec) -> None:
    CATALOG.register(spec.name, spec)


_add(
    TeacherSpec(
        name="uni",
        loader="timm",
        hub_id="MahmoodLab/uni",
        arch="vit_large_patch16_224",
        model_kwargs={"img_size": 224, "init_values": 1e-5},
        embed_dim=1024,
        patch_size=16,
        num_prefix_tokens=1,
        license=NC_ND,
        gated=True,
        noncommercial_derivatives=True,
        url="https://huggingface.co/MahmoodLab/UNI",
    )
)
_add(
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
        license=NC_ND,
        gated=True,
        noncommercial_derivatives=True,
        url="https://huggingface.co/MahmoodLab/UNI2-h",
    )
)
_add(
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
        license=NC_ND,
        gated=True,
        noncommercial_derivatives=True,
        url="https://huggingface.co/MahmoodLab/CONCH",
        notes="Image tower of a CoCa model; summary = attentional-pool contrastive embedding (512-d, before "
        "projection), patches = trunk tokens (768-d). Needs the `conch` extra.",
    )
)
_add(
    TeacherSpec(
        name="conch-v1.5",
        loader="conch",
        hub_id="MahmoodLab/conchv1_5",
        arch="conch_ViT-B-16",
        model_kwargs={
            "embed_dim": 768,
            "vision_cfg": {"layers": 24, "width": 1024, "num_heads": 16, "attentional_pool_caption": False},
        },
        hub_filename="pytorch_model_vision.bin",
        embed_dim=1024,
        patch_size=16,
        num_prefix_tokens=1,
        input_size=448,
        embedding="pooled",
        summary_dim=768,
        license=NC_ND,
        gated=True,
        noncommercial_derivatives=True,
        url="https://huggingface.co/MahmoodLab/conchv1_5",
        notes="[unverified] ViT-L/16 trunk + 1-query attentional pooler -> 768 (TRIDENT); that the checkpoint's "
        "keys match CONCH's VisualModel layout is assumed, a mismatch is reported key by key at load.",
    )
)
_add(
    TeacherSpec(
        name="phikon",
        loader="transformers",
        hub_id="owkin/phikon",
        arch="ViTConfig",
        embed_dim=768,
        patch_size=16,
        num_prefix_tokens=1,
        license="Owkin non-commercial",
        url="https://huggingface.co/owkin/phikon",
    )
)
_add(
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
        license="Owkin non-commercial",
        url="https://huggingface.co/owkin/phikon-v2",
    )
)
_HOPT = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.33334, **SWIGLU, "no_embed_class": True}
_add(
    TeacherSpec(
        name="h-optimus-0",
        loader="timm",
        hub_id="bioptimus/H-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        model_kwargs=_HOPT,
        embed_dim=1536,
        patch_size=14,
        num_prefix_tokens=5,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        license="Apache-2.0",
        url="https://huggingface.co/bioptimus/H-optimus-0",
        notes="Native 224 px at 0.5 um/px.",
    )
)
_add(
    TeacherSpec(
        name="h-optimus-1",
        loader="timm",
        hub_id="bioptimus/H-optimus-1",
        arch="vit_giant_patch14_reg4_dinov2",
        model_kwargs=_HOPT,
        embed_dim=1536,
        patch_size=14,
        num_prefix_tokens=5,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        license="see model card (not checked)",
        gated=True,
        url="https://huggingface.co/bioptimus/H-optimus-1",
    )
)
_add(
    TeacherSpec(
        name="h0-mini",
        loader="timm",
        hub_id="bioptimus/H0-mini",
        arch="vit_base_patch14_reg4_dinov2",
        model_kwargs={"img_size": 224, "mlp_ratio": 5.33334, **SWIGLU},
        embed_dim=768,
        patch_size=14,
        num_prefix_tokens=5,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        license=NC_ND,
        gated=True,
        noncommercial_derivatives=True,
        url="https://huggingface.co/bioptimus/H0-mini",
        notes="Distilled from H-optimus-0. mlp_ratio 5.33334 inferred from the 85.7M size. Use embedding "
        "'cls+mean' for the 1536-d variant.",
    )
)
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **SWIGLU}
_add(
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
    )
)
_add(
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
        license=NC_ND,
        gated=True,
        url="https://huggingface.co/paige-ai/Virchow2",
    )
)
_add(
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
        notes="The card resizes to 256 and centre-crops 224; multiteach resizes the whole view to 224.",
    )
)
_HIBOU = {"patch_size": 14, "image_size": 224, "num_register_tokens": 4, "trust_remote_code": True}
_add(
    TeacherSpec(
        name="hibou-b",
        loader="transformers",
        hub_id="histai/hibou-b",
        arch="Dinov2WithRegistersConfig",
        model_kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, **_HIBOU},
        embed_dim=768,
        patch_size=14,
        num_prefix_tokens=5,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        license="see model card (not checked)",
        url="https://huggingface.co/histai/hibou-b",
        notes="Loaded with trust_remote_code as on the card; summary = CLS (plismbench), TRIDENT uses pooler_output.",
    )
)
_add(
    TeacherSpec(
        name="hibou-l",
        loader="transformers",
        hub_id="histai/hibou-L",
        arch="Dinov2WithRegistersConfig",
        model_kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, **_HIBOU},
        embed_dim=1024,
        patch_size=14,
        num_prefix_tokens=5,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        license="see model card (not checked)",
        url="https://huggingface.co/histai/hibou-L",
    )
)
_add(
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
        license="see model card (not checked)",
        url="https://github.com/kaiko-ai/towards_large_pathology_fms",
    )
)
_add(
    TeacherSpec(
        name="gpfm",
        loader="timm",
        hub_id="majiabo/GPFM",
        arch="vit_large_patch14_dinov2",
        model_kwargs={"img_size": 224, "init_values": 1e-5},
        hub_filename="GPFM.pth",
        weights_format="dinov2",
        embed_dim=1024,
        patch_size=14,
        num_prefix_tokens=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license=NC_ND,
        url="https://github.com/birkhoffkiki/GPFM",
        notes="[unverified] GPFM.pth is assumed to hold DINOv2-format keys, converted with timm's dinov2 filter.",
    )
)
_add(
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
        notes="Shipped inside the package (fp16, no network): a ViT-Ti/16 at 112 px pretrained by multiteach's own "
        "DINO + iBOT + KoLeo recipe (`pretrain_tiny`) on real H&E tiles; the small, real teacher every machine has.",
    )
)
