"""Data ingestion for training: image folders, nuclei-mask datasets, whole-slide tiling,
paired-stain datasets and group-aware splits. Resolution is always explicit (``mpp``).

Example:
    >>> from training.data import CoNSePDataset, group_split
    >>> ds = CoNSePDataset("../shared/data/consep", "train")                   # doctest: +SKIP
    >>> parts = group_split(ds.source_ids, (0.8, 0.2), seed=0)                 # doctest: +SKIP

See docs/data.md for layouts, conventions and measured speeds.
"""

from training.data.folders import ImageFolderDataset, fit_image, scan_image_folder
from training.data.masks import (
    CONSEP_CLASSES,
    CoNSePDataset,
    ImageMaskDataset,
    MoNuSegDataset,
    NucleiMaskDataset,
    consep_source_id,
)
from training.data.paired import MIST_MARKERS, BCIDataset, MISTDataset, PairedStainDataset
from training.data.slides import (
    Slide,
    SlideTileDataset,
    TilingConfig,
    open_slide,
    plan_tiles,
    tile_slide,
    tissue_mask,
)
from training.data.splits import (
    GroupedSplit,
    NearDuplicateConfig,
    check_no_straddle,
    group_split,
    lc25000_grouped_split,
    near_duplicate_groups,
)

__all__ = [
    "ImageFolderDataset", "fit_image", "scan_image_folder",
    "NucleiMaskDataset", "CoNSePDataset", "MoNuSegDataset", "ImageMaskDataset", "CONSEP_CLASSES",
    "consep_source_id",
    "PairedStainDataset", "BCIDataset", "MISTDataset", "MIST_MARKERS",
    "Slide", "open_slide", "TilingConfig", "tissue_mask", "plan_tiles", "tile_slide", "SlideTileDataset",
    "group_split", "check_no_straddle", "NearDuplicateConfig", "near_duplicate_groups", "GroupedSplit",
    "lc25000_grouped_split",
]
