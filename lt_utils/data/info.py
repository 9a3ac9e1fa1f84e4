"""LTInfo: what defines an LT split (source, ρ, seed, selection, val policy) and its per-class train counts and groups."""
import dataclasses
import json
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_json
from .counts import GROUPS, assign_groups

INFO_FILENAME = "lt_info.json"


@dataclasses.dataclass
class LTInfo:
    dataset: str
    class_names: list
    train_counts: list
    groups: list
    imb: float = None
    max_per_class: int = None
    seed: int = 0
    selection: str = "rng"
    val_source: str = "unused_train"
    val_per_class: int = 20
    many_threshold: int = 100
    few_threshold: int = 20
    source: str = ""
    split_sizes: dict = dataclasses.field(default_factory=dict)
    # sha256 of each split's source indices: two splits with equal hashes hold the same images
    index_hashes: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self):
        return len(self.class_names)

    def group_of(self, class_id):
        return self.groups[class_id]

    def group_counts(self):
        return {g: sum(1 for x in self.groups if x == g) for g in GROUPS}

    def with_thresholds(self, many_threshold, few_threshold):
        groups = assign_groups(self.train_counts, many_threshold, few_threshold)
        return dataclasses.replace(self, many_threshold=many_threshold, few_threshold=few_threshold, groups=groups)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    def save(self, path):
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} not found; point to a directory written by save_lt_to_disk / build_lt.py")
        from ..fileio import read_json

        saved = read_json(path, "split record")
        try:
            return cls.from_dict(saved)
        except TypeError:  # not a mapping, or lacking the required fields
            raise UserError(f"{path} is not a valid split record; build the dataset again") from None

    @classmethod
    def from_dataset(cls, ds):
        """Recover the LTInfo embedded (as JSON) in a split's `ds.info.description`."""
        try:
            return cls.from_dict(json.loads(ds.info.description))
        except (TypeError, ValueError) as err:
            raise UserError("this dataset carries no LT info; build it with lt_utils.data.load_lt_dataset") from err
