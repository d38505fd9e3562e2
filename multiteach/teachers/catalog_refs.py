"""What the catalog entries cite: pinned public references, the facts a reference can confirm, shared statistics.

:mod:`multiteach.teachers.catalog_entries` writes each entry's ``verified_against`` from the references here
(``owner/repo@commit:path`` of public code that was read; facts carry over, no code does) and its ``checked``
from the fact labels. The normalisation statistics are the ones several entries (and their tests) share.
"""

from __future__ import annotations

__all__ = [
    "ARCH",
    "CONCH",
    "EMBED",
    "GATING",
    "GIGAPATH",
    "GPFM",
    "HIBOU",
    "HIBOU_MEAN",
    "HIBOU_STD",
    "HOPTIMUS_MEAN",
    "HOPTIMUS_STD",
    "KAIKO",
    "KEYS",
    "LICENCE",
    "PLISM",
    "PREPROC",
    "REVISION",
    "TOKENS",
    "TRIDENT",
    "TRIDENT_CONCH15",
    "TRIDENT_CONSTANTS",
    "UNI_README",
]

# Per-channel RGB normalisation (mean, std) of the H-optimus family and of the Hibou family.
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)

# Public references read for the entries (facts carry over, no code does).
TRIDENT = "mahmoodlab/TRIDENT@a91fa8490e02:trident/patch_encoder_models/load.py"
TRIDENT_CONSTANTS = "mahmoodlab/TRIDENT@a91fa8490e02:trident/patch_encoder_models/utils/constants.py"
TRIDENT_CONCH15 = "mahmoodlab/TRIDENT@a91fa8490e02:trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py"
PLISM = "owkin/plism-benchmark@b4f32b7c233e:plismbench/models/{}.py"
UNI_README = "mahmoodlab/UNI@42715efc1172:README.md"
CONCH = "mahmoodlab/CONCH@141cc09c7d4f:{}"
GIGAPATH = "prov-gigapath/prov-gigapath@09d8e876afb9:{}"
KAIKO = "kaiko-ai/towards_large_pathology_fms@bfcde171e200:{}"
HIBOU = "HistAI/hibou@c453bbe4dab0:{}"
GPFM = "birkhoffkiki/GPFM@4f8be2b1f163:{}"
# What a reference can confirm (``TeacherSpec.checked``).
ARCH, TOKENS, EMBED, PREPROC = "architecture kwargs", "token layout", "embedding rule", "preprocessing"
KEYS, LICENCE, GATING, REVISION = "checkpoint key layout", "licence", "gating", "revision"
