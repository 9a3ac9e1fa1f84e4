"""LTInfo: what defines an LT split (source, ρ, seed, selection, validation policy) and its per-class train counts and groups."""
import dataclasses
import json
import math
from pathlib import Path

from ..axes import LEGACY_SPLIT_NAMES
from ..errors import UserError
from ..fileio import atomic_write_json
from .counts import GROUPS, assign_groups, lt_counts

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
    # hf_lt: the `datasets` source (name, config, revision, splits, columns, --max_train_samples, its splits'
    # fingerprints), so eval_lt.py and resume rebuild the same split
    hf_source: dict = None
    # groups from the counts of the same source at this rho (LIFT: rho 100 for every CIFAR-100-LT); None: own counts
    groups_from_imb: float = None
    # --train_val_split: the fraction of each class's source train images held out as validation; None: val_source
    train_val_split: float = None

    @property
    def imb_text(self):
        """The ratio as reports show it: rho, or the source's own counts (--imb none) with the ratio they realise."""
        if self.imb is not None:
            return f"{self.imb:g}"
        return f"none (the source's counts: {max(self.train_counts) / max(1, min(self.train_counts)):g})"

    @property
    def num_classes(self):
        return len(self.class_names)

    def group_of(self, class_id):
        return self.groups[class_id]

    def group_counts(self):
        return {g: sum(1 for x in self.groups if x == g) for g in GROUPS}

    def with_thresholds(self, many_threshold, few_threshold):
        groups = assign_groups(self.group_counts_source(), many_threshold, few_threshold)
        return dataclasses.replace(self, many_threshold=many_threshold, few_threshold=few_threshold, groups=groups)

    def with_groups_from_imb(self, imb):
        """Groups taken from the counts the same rule gives at ratio `imb` (LIFT: CIFAR-100-LT rho 50 / 10 are
        reported with the rho = 100 split's 35 / 35 / 30 groups)."""
        if imb is None:
            return self
        if self.imb is None:
            raise UserError(f"--groups_from_imb needs a dataset split by the rho rule (cifar100_lt, cifar10_lt, "
                            f"fashion_mnist_lt, imagefolder_lt, hf_lt); {self.dataset} keeps its source's counts "
                            "(lists, --imb none): drop the flag")
        if float(imb) < 1:
            raise UserError(f"--groups_from_imb {imb:g}: the reference ratio must be >= 1, e.g. 100")
        info = dataclasses.replace(self, groups_from_imb=float(imb))
        return info.with_thresholds(self.many_threshold, self.few_threshold)

    def group_counts_source(self):
        """The counts the groups come from: the split's own, or the reference split's (class 0 keeps n_max)."""
        if self.groups_from_imb is None:
            return list(self.train_counts)
        return lt_counts(self.train_counts[0], self.groups_from_imb, len(self.train_counts))

    @property
    def split_groups(self):
        """The groups of the split's own counts (differs from `groups` under --groups_from_imb)."""
        return assign_groups(self.train_counts, self.many_threshold, self.few_threshold)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, origin="the split record"):
        """An LTInfo read back from a record (lt_info.json, an export's config.json), its numbers checked."""
        names = {f.name for f in dataclasses.fields(cls)}
        info = cls(**{k: v for k, v in with_current_split_names(d).items() if k in names})
        problem = info.record_problem()
        if problem:
            raise UserError(f"{origin} is damaged ({problem}); build the dataset or export the run again")
        return info

    def record_problem(self):
        """What makes this record unusable (counts, groups, ratios, thresholds), or None."""
        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        def ratio(v):
            return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 1)

        n = len(self.class_names)
        if len(self.train_counts) != n or not all(map(count, self.train_counts)):
            return f"train_counts must be {n} counts >= 0"
        if len(self.groups) != n or any(g not in GROUPS for g in self.groups):
            return f"groups must be {n} of {', '.join(GROUPS)}"
        if not (ratio(self.imb) and ratio(self.groups_from_imb)):
            return f"imb {self.imb} / groups_from_imb {self.groups_from_imb} must be finite and >= 1"
        if not all(map(count, (self.many_threshold, self.few_threshold, self.val_per_class))) or \
                not (self.max_per_class is None or count(self.max_per_class)):
            return "thresholds, val_per_class and max_per_class must be whole numbers >= 0"
        return None

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
            return cls.from_dict(saved, origin=str(path))
        except TypeError:  # not a mapping, or lacking the required fields
            raise UserError(f"{path} is not a valid split record; build the dataset again") from None

    @classmethod
    def from_dataset(cls, ds):
        """Recover the LTInfo embedded (as JSON) in a split's `ds.info.description`."""
        try:
            return cls.from_dict(json.loads(ds.info.description))
        except (TypeError, ValueError) as err:
            raise UserError("this dataset carries no LT info; build it with lt_utils.data.load_lt_dataset") from err


def current_split_names(splits):
    """A mapping keyed by split (a saved DatasetDict, a record's per-split values) with the splits of earlier versions
    under this version's names ("val" -> "validation"); anything else as it is."""
    if not isinstance(splits, dict):
        return splits
    renamed = {LEGACY_SPLIT_NAMES.get(name, name): value for name, value in splits.items()}
    return type(splits)(renamed) if len(renamed) == len(splits) else splits


def with_current_split_names(record):
    """An LTInfo record (a dict) with its per-split values (split_sizes, index_hashes) under this version's split names."""
    return {k: current_split_names(v) if k in ("split_sizes", "index_hashes") else v for k, v in record.items()}


def embed_info(ds, info):
    """Store the LTInfo in every split's `info.description`, so `LTInfo.from_dataset` recovers it."""
    for split in ds.values():
        split.info.description = info.to_json()
    return ds
