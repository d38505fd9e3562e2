"""Data, as floors: each sub-package imports only from the floors below it (``tests/test_layout.py`` checks).

1. ``views/`` (augmentations, multi-crop, iBOT masks, perturbations) and ``wsi/`` (reading slides) know no files
   list and no dataset.
2. ``lists/``: tile and slide lists.
3. ``index/``: the tissue index of a slide list.
4. ``sources/`` (the training sources behind one contract) and ``tiling/`` (offline ``multiteach tile``).
5. ``online/`` (online patching), ``loader.py`` (the seeded loader) and ``check.py`` (``multiteach data check``).

This module re-exports the user-facing names of every floor.
"""

from multiteach.data.lists.images import (
    IMAGE_EXTENSIONS,
    find_images,
    labelled_folder,
    load_rgb,
    read_path_list,
    verify_image,
)
from multiteach.data.sources.tile_dataset import TileDataset
from multiteach.data.tiling import TileGrid, TileWriteResult, WSITileDataset, plan_tiles, read_tile, write_tiles
from multiteach.data.views.augment import (
    ColorJitter,
    ColorParams,
    HEDJitter,
    HEDParams,
    RandomGaussianBlur,
    RandomRot90Flip,
    color_jitter,
    dihedral,
    gaussian_blur,
    hed_jitter,
    hed_to_rgb,
    resized_crop,
    rgb_to_hed,
    sample_crop_box,
    to_tensor01,
)
from multiteach.data.views.masking import MaskingGenerator, sample_ibot_masks
from multiteach.data.views.multicrop import (
    MultiCropCollator,
    MultiCropTransform,
    ViewParams,
    apply_view,
    collate_multicrop,
)
from multiteach.data.wsi import choose_level, open_slide, slide_mpp, tissue_mask

__all__ = [
    "TileGrid",
    "TileWriteResult",
    "WSITileDataset",
    "choose_level",
    "open_slide",
    "plan_tiles",
    "read_tile",
    "slide_mpp",
    "tissue_mask",
    "write_tiles",
    "IMAGE_EXTENSIONS",
    "ColorJitter",
    "ColorParams",
    "HEDJitter",
    "HEDParams",
    "MaskingGenerator",
    "MultiCropCollator",
    "MultiCropTransform",
    "RandomGaussianBlur",
    "RandomRot90Flip",
    "TileDataset",
    "ViewParams",
    "apply_view",
    "collate_multicrop",
    "color_jitter",
    "dihedral",
    "find_images",
    "gaussian_blur",
    "hed_jitter",
    "hed_to_rgb",
    "labelled_folder",
    "load_rgb",
    "read_path_list",
    "resized_crop",
    "rgb_to_hed",
    "sample_ibot_masks",
    "sample_crop_box",
    "to_tensor01",
    "verify_image",
]
