"""Long-tail dataset layer: LT builders on `datasets`, their LTInfo, saving/loading, class-capped subsets."""
from .counts import assign_groups, group_of_count, lt_counts
from .info import LTInfo
from .loading import DATASET_NAMES, load_lt_dataset, load_lt_from_disk, save_lt_to_disk
from .subsets import capped_subset

__all__ = [
    "DATASET_NAMES", "LTInfo", "assign_groups", "capped_subset", "group_of_count", "load_lt_dataset",
    "load_lt_from_disk", "lt_counts", "save_lt_to_disk",
]
