"""Data: class-disjoint splits (:mod:`lib.data.splits`) and image lists (:mod:`lib.data.datasets`)."""
from lib.data.datasets import ImageList, ImageLoadError, load_image, to_rgb, verify_images
from lib.data.splits import (
    DATASETS,
    DatasetSplit,
    carve_val,
    load_split,
    load_split_json,
    parse_dataset_spec,
    register_dataset,
    save_split_json,
    split_summary,
    trainval,
    validate_split,
)

__all__ = [
    "DATASETS", "DatasetSplit", "ImageList", "ImageLoadError", "carve_val", "load_image", "load_split",
    "load_split_json", "parse_dataset_spec", "register_dataset", "save_split_json", "split_summary", "to_rgb",
    "trainval", "validate_split", "verify_images",
]
