"""`datasets` builders for the LT splits: one `GeneratorBasedBuilder` per source family, parameterised by `LTConfig`.

A builder reads its source (sources.py), decides which images go to train / validation / test (counts.py),
stores the LTInfo as JSON in `info.description`, and writes the images as encoded bytes. The config,
including a fingerprint of the source files, keys the cache, so a second build is a cache hit.
"""
import dataclasses
import hashlib
import math
from typing import Optional

import datasets
import numpy as np
from datasets.builder import Key

from ..errors import UserError
from . import sources
from .counts import (
    assign_groups, check_no_empty_class, class_order, flat_sorted, indices_by_class, lt_counts, source_counts,
    take_lt,
)
from .hf_source import HFSpec, read_hf_source
from .info import LTInfo
from .source_base import SOURCE_VAL



@dataclasses.dataclass
class LTConfig(datasets.BuilderConfig):
    """Everything that defines an LT split. Field meanings: `load_lt_dataset`'s docstring."""

    imb: Optional[float] = 100.0  # None: the source's own counts
    max_per_class: Optional[int] = None
    seed: int = 0
    selection: str = "rng"
    val_per_class: int = 20
    val_source: str = "unused_train"
    many_threshold: int = 100
    few_threshold: int = 20
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    test_list: Optional[str] = None
    class_names_file: Optional[str] = None
    relabel_by_name: bool = False
    test_dir: Optional[str] = None
    val_dir: Optional[str] = None
    test_per_class: int = 50
    train_val_split: Optional[float] = None
    source_fingerprint: str = ""
    source_content: str = ""  # sources.content_hash of the local source files: part of each split's identity
    # hf_lt: the `datasets` source (hf_source.HFSpec's fields; its dataset_name is source_name here, as the builder's
    # own dataset_name is taken)
    source_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    dataset_revision: Optional[str] = None
    train_split: str = "train"
    validation_split: Optional[str] = None
    test_split: Optional[str] = None
    image_column_name: str = "image"
    label_column_name: str = "label"
    max_train_samples: Optional[int] = None
    trust_remote_code: bool = False


def features_for(class_names):
    # draw_rank: the image's position in its class's draw (train, validation from unused train images) or in its class's
    # source order (test); LT-Soups' exact capped subsets draw from each class in this order (subsets.py)
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names)),
                              "draw_rank": datasets.Value("int32")})


def index_hash(source_split, indices):
    return hashlib.sha256(source_split.encode() + np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def first_per_class(labels, num_classes, k):
    """Positions of the first k items of each class, in source order, and the rest."""
    chosen = np.concatenate([idx[:k] for idx in indices_by_class(labels, num_classes)]).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return np.sort(chosen), rest


class LTBuilder(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIG_CLASS = LTConfig
    # 1.1: the draw_rank column; 1.2: the validation split named "validation" (a cached "val" is not reused)
    VERSION = datasets.Version("1.2.0")
    DATASET = ""
    USES_IMB = True  # False: the source fixes the counts, so imb must not split the cache
    EMPTY_CLASS_HINT = "lower --imb or raise --max_per_class"
    BUILDER_CONFIGS = [LTConfig(name=f"imb{r}", imb=float(r)) for r in (100, 50, 10)]

    def __init__(self, *args, dataset_name=None, **kwargs):
        super().__init__(*args, dataset_name=dataset_name or self.DATASET, **kwargs)

    def _info(self):
        # features need the class names, which come with the source: set in _split_generators
        return datasets.DatasetInfo()

    # ---- hooks for subclasses
    @classmethod
    def config_name_for(cls, imb):
        return "source_counts" if imb is None else f"imb{imb:g}"

    @classmethod
    def source_files(cls, config):
        """Local files that make up the source (validated to exist); their stats key the cache."""
        raise NotImplementedError

    def read_source(self):
        raise NotImplementedError

    def train_counts(self, order):
        """Per-class train counts from each class's available images."""
        cfg = self.config
        if cfg.imb is None:
            return source_counts(order, cfg.max_per_class)
        n_max = cfg.max_per_class or min(len(o) for o in order)
        return lt_counts(n_max, cfg.imb, len(order)), n_max

    # ---- shared logic
    def plan(self, source):
        """split -> (source split, source indices), plus the train counts and n_max."""
        cfg = self.config
        names = source.class_names
        order = class_order(source.splits["train"].labels, len(names), cfg.seed, cfg.selection)
        if "test" in source.splits:
            test = ("test", np.arange(len(source.splits["test"].labels)))
        else:
            order, test = self.carve_test(order, names)
        held_val = None
        if cfg.train_val_split is not None:
            order, held_val = self.carve_val(source, order)
        counts, n_max = self.train_counts(order)
        check_no_empty_class(counts, names, self.EMPTY_CLASS_HINT)
        train, unused = take_lt(order, counts, names, extra=0 if held_val else cfg.val_per_class)
        val, test = (held_val, test) if held_val else self.choose_val(source, test, unused)
        return {"train": ("train", flat_sorted(train)), "validation": val, "test": test}, counts, n_max

    def draw_ranks(self, source, src):
        """Per source image of split `src`: its position in its class's draw (the source's train split, drawn by
        `selection`), or in its class's source order (a test or validation split, never drawn)."""
        labels = source.splits[src].labels
        per_class = indices_by_class(labels, len(source.class_names))
        if src == "train":
            per_class = class_order(labels, len(source.class_names), self.config.seed, self.config.selection)
        ranks = np.empty(len(labels), dtype=np.int64)
        for idx in per_class:
            ranks[idx] = np.arange(len(idx))
        return ranks

    def carve_val(self, source, order):
        """--train_val_split f: the last ceil(f * n) images of each class's drawn order (n its source train images,
        at least one kept for train) are validation, held out before the LT rule."""
        if SOURCE_VAL in source.splits:
            raise UserError(f"--train_val_split {self.config.train_val_split:g}: {source.description} has its own "
                            "validation split; drop the flag")
        keep = [max(1, len(idx) - math.ceil(self.config.train_val_split * len(idx))) for idx in order]
        return [idx[:k] for idx, k in zip(order, keep)], ("train", flat_sorted([idx[k:] for idx, k in zip(order, keep)]))

    def choose_val(self, source, test, unused):
        """(validation, test): the source's own validation split if it has one, else per `val_source`."""
        if SOURCE_VAL in source.splits:
            return (SOURCE_VAL, np.arange(len(source.splits[SOURCE_VAL].labels))), test
        if self.config.val_source == "test_slice":
            src, idx = test
            val_pos, test_pos = first_per_class(source.splits[src].labels[idx], len(source.class_names),
                                                self.config.val_per_class)
            return (src, idx[val_pos]), (src, idx[test_pos])
        return ("train", flat_sorted(unused)), test

    def carve_test(self, order, class_names):
        raise UserError(f"{self.DATASET} needs a test split in its source")

    def hold_out_test(self, order, class_names):
        """A balanced test set: the last `test_per_class` images of each class's drawn order, taken before the LT draw."""
        k = self.config.test_per_class
        for c, idx in enumerate(order):
            if len(idx) <= k:
                raise UserError(
                    f"class {c} ({class_names[c]}) has {len(idx)} images, not more than the {k} held out per class "
                    "for test; pass a test split (--test_dir, --test_split) or a lower --test_per_class"
                )
        return [idx[: len(idx) - k] for idx in order], ("train", flat_sorted([idx[len(idx) - k :] for idx in order]))

    def lt_info(self, source, plan, counts, n_max):
        cfg = self.config
        return LTInfo(
            dataset=self.DATASET, class_names=list(source.class_names), train_counts=[int(c) for c in counts],
            groups=assign_groups(counts, cfg.many_threshold, cfg.few_threshold),
            imb=None if cfg.imb is None else float(cfg.imb), train_val_split=cfg.train_val_split,
            max_per_class=int(n_max), seed=cfg.seed, selection=cfg.selection, val_source=cfg.val_source,
            val_per_class=cfg.val_per_class, many_threshold=cfg.many_threshold, few_threshold=cfg.few_threshold,
            source=source.description, split_sizes={s: int(len(idx)) for s, (_, idx) in plan.items()},
            # which images, not only which positions: other files at the same positions are another split
            index_hashes={s: index_hash(f"{src}@{cfg.source_content}" if cfg.source_content else src, idx)
                          for s, (src, idx) in plan.items()},
        )

    def _split_generators(self, dl_manager):
        source = self.read_source()
        plan, counts, n_max = self.plan(source)
        self.info.features = features_for(source.class_names)
        self.info.description = self.lt_info(source, plan, counts, n_max).to_json()
        ranks = {src: self.draw_ranks(source, src) for src in {src for src, _ in plan.values()}}
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"part": source.splits[src], "indices": idx,
                                                            "ranks": ranks[src][idx]})
            for split, (src, idx) in plan.items()
        ]

    def _generate_examples(self, part, indices, ranks):
        labels = part.labels[indices]
        for k, (data, label, rank) in enumerate(zip(part.images.iter_bytes(indices), labels, ranks)):
            yield Key(0, k), {"image": {"bytes": data, "path": None}, "label": int(label), "draw_rank": int(rank)}


class Cifar100LT(LTBuilder):
    """CIFAR-100-LT: `uoft-cs/cifar100` on the Hub or a local `cifar-100-python/`; test = the full 10k test set."""

    DATASET = "cifar100_lt"
    NUM_CLASSES = 100

    @classmethod
    def source_files(cls, config):
        return sources.cifar_files(config.data_dir, cls.NUM_CLASSES) if config.data_dir else []

    def read_source(self):
        return sources.read_cifar(self.config.data_dir, self.NUM_CLASSES, cache_dir=self._cache_dir_root)


class Cifar10LT(Cifar100LT):
    """CIFAR-10-LT: `uoft-cs/cifar10` on the Hub or a local `cifar-10-batches-py/`."""

    DATASET = "cifar10_lt"
    NUM_CLASSES = 10


class FashionMnistLT(LTBuilder):
    """Fashion-MNIST-LT from the four IDX files (gz or not) or `zalando-datasets/fashion_mnist` (data_dir None)."""

    DATASET = "fashion_mnist_lt"
    BUILDER_CONFIGS = LTBuilder.BUILDER_CONFIGS + [LTConfig(name="quickstart", imb=100.0, max_per_class=600)]

    @classmethod
    def source_files(cls, config):
        return sources.idx_files(config.data_dir) if config.data_dir else []

    def read_source(self):
        return sources.read_fashion_mnist(self.config.data_dir, cache_dir=self._cache_dir_root)


class ImageFolderLT(LTBuilder):
    """Any folder-per-class dataset. Test/val from `test_dir`/`val_dir` (same class folders) when given;
    otherwise `test_per_class` images per class are held out for test before the LT draw, and validation
    follows `val_source`."""

    DATASET = "imagefolder_lt"

    @classmethod
    def source_files(cls, config):
        if config.data_dir is None:
            raise UserError("imagefolder_lt needs --data_dir (a folder with one sub-folder of images per class)")
        return sources.image_folder_files(config.data_dir, config.test_dir, config.val_dir)

    def read_source(self):
        cfg = self.config
        return sources.read_image_folder(cfg.data_dir, cfg.test_dir, cfg.val_dir)

    carve_test = LTBuilder.hold_out_test


class ListLTBuilder(LTBuilder):
    """An image root plus OLTR txt lists (`relative/path label`); the lists define the split, `imb` is unused.
    `max_per_class` caps each class's train images (drawn by `selection`); val = the val list, else per `val_source`."""

    BUILDER_CONFIGS = [LTConfig(name="lists")]
    USES_IMB = False
    EMPTY_CLASS_HINT = "every class needs at least one image in the train list; fix the list or the class-names file"

    @classmethod
    def config_name_for(cls, imb):
        return "lists"

    @classmethod
    def source_files(cls, config):
        if config.train_list is None or config.test_list is None or config.data_dir is None:
            raise UserError(
                f"{cls.DATASET} needs --data_dir (the image root), --train_list and --test_list "
                "(OLTR 'relative/path label' files)"
            )
        root = sources.require_dir(config.data_dir, "image root")
        files = [config.train_list, config.val_list, config.test_list, config.class_names_file]
        lists = [config.train_list, config.val_list, config.test_list]
        # the listed images too: the same lists over rewritten images are another source
        return [sources.require_file(f, "file") for f in files if f is not None] + \
            [root / rel for f in lists if f is not None for rel in sources.listed_files(root, f)]

    def read_source(self):
        cfg = self.config
        lists = {"train": cfg.train_list, SOURCE_VAL: cfg.val_list, "test": cfg.test_list}
        return sources.read_oltr(cfg.data_dir, lists, cfg.class_names_file, cfg.relabel_by_name)

    def train_counts(self, order):
        return source_counts(order, self.config.max_per_class)

    def lt_info(self, source, plan, counts, n_max):
        info = super().lt_info(source, plan, counts, n_max)
        info.imb = max(counts) / max(min(counts), 1)  # the ratio the lists realise
        return info


class ImageNetLT(ListLTBuilder):
    DATASET = "imagenet_lt"


class PlacesLT(ListLTBuilder):
    DATASET = "places_lt"


class INat2018(ListLTBuilder):
    """iNaturalist 2018 from the OLTR lists; `relabel_by_name` applies LIFT's sorted-name class order."""

    DATASET = "inat2018"


class DatasetsLT(LTBuilder):
    """Any `datasets` image-classification dataset (`--dataset_name`: a Hub id or a local folder; hf_source.py): the
    LT rule on its train split (`--max_train_samples` first), validation = its `--validation_split` or unused train images,
    test = its `--test_split` ("test" by default) or, when it has none, `test_per_class` images per class held out."""

    DATASET = "hf_lt"
    SPEC_FIELDS = ("dataset_name", "dataset_config_name", "dataset_revision", "train_split", "validation_split",
                   "test_split", "image_column_name", "label_column_name", "class_names_file", "max_train_samples",
                   "trust_remote_code")

    @classmethod
    def spec(cls, config):
        if config.source_name is None:
            raise UserError("hf_lt needs --dataset_name (a Hub dataset id or a local dataset folder)")
        return HFSpec(config.source_name, **{f: getattr(config, f) for f in cls.SPEC_FIELDS[1:]})

    def read_source(self):
        source, self.fingerprints = read_hf_source(self.spec(self.config), self.config.seed, self._cache_dir_root)
        return source

    carve_test = LTBuilder.hold_out_test

    def lt_info(self, source, plan, counts, n_max):
        info = super().lt_info(source, plan, counts, n_max)
        info.hf_source = {**dataclasses.asdict(self.spec(self.config)), "fingerprints": dict(self.fingerprints)}
        # the same indices of another source (a new Hub revision, an edited folder) are other images
        info.index_hashes = {s: index_hash(f"{src}@{self.fingerprints[src]}", idx)
                             for s, (src, idx) in plan.items()}
        return info


BUILDERS = {b.DATASET: b for b in (Cifar100LT, Cifar10LT, FashionMnistLT, ImageNetLT, PlacesLT, INat2018, ImageFolderLT,
                                   DatasetsLT)}
