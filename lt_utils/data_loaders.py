"""Data for training and evaluation: the LT split, its transforms, seeded augmentation, samplers and loaders."""
from pathlib import Path

import numpy as np

import torch
from torch.utils.data import DataLoader, TensorDataset

from .config import HF_SOURCE_FLAGS
from .data import capped_subset, load_lt_dataset
from .errors import require
from .peft_methods import METHODS
from .samplers import ClassBalancedSampler
from .data.images import SMALL_IMAGE_PIXELS, ImageSplit
from .transforms import (CropBoxes, DeviceResizedCropFlip, NoAugment, PaddedCropFlip, RandomFlip,
                         SeededAugment, build_eval_transform, build_plain_transform, build_train_transform,
                         build_tte_transform, collate)


def load_data(data, accelerator):
    """(DatasetDict, LTInfo) of a spec.DataSpec."""
    with accelerator.main_process_first():
        ds, info = load_lt_dataset(
            data.dataset, imb=data.imb, data_dir=data.data_dir, max_per_class=data.max_per_class, seed=data.imb_seed,
            selection=data.selection, val_per_class=data.val_per_class, val_source=data.val_source,
            train_list=data.train_list, val_list=data.val_list, test_list=data.test_list,
            class_names_file=data.class_names_file, many_threshold=data.many_threshold,
            few_threshold=data.few_threshold, cache_dir=data.cache_dir, test_dir=data.test_dir, val_dir=data.val_dir,
            relabel_by_name=data.relabel_by_name, config_name=data.dataset_config_name,
            train_val_split=data.train_val_split,
            **{flag: getattr(data, flag) for flag in HF_SOURCE_FLAGS if flag not in ("class_names_file", "dataset_config_name")})
    return ds, record_saved_folder(info, data.dataset).with_groups_from_imb(data.groups_from_imb)


def record_saved_folder(info, dataset_arg):
    """A split loaded from a build_lt.py folder or Hub repo is recorded by that folder (or repo id), so eval_lt.py
    finds the same images."""
    import dataclasses

    from .data.hub import is_hub_dataset_id
    from .data.loading import is_saved_lt_dir

    if is_hub_dataset_id(dataset_arg):
        return dataclasses.replace(info, dataset=str(dataset_arg))
    return dataclasses.replace(info, dataset=str(Path(dataset_arg).resolve())) if is_saved_lt_dir(dataset_arg) else info


def limit_eval_splits(ds, max_eval_samples):
    """--max_eval_samples: a seeded subset of validation and test, for quick debugging runs only."""
    if not max_eval_samples:
        return ds
    for split in ("validation", "test"):
        if len(ds[split]) > max_eval_samples:
            ds[split] = ds[split].shuffle(seed=0).select(range(max_eval_samples))
    return ds


def training_split(ds, info, loss):
    """The images and class counts the loss sees (`loss`: a spec.LossSpec): the full LT train split, or LT-Soups'
    capped subset."""
    if loss.balance_factor is None:
        return ds["train"], list(info.train_counts)
    require(loss.balance_factor >= 1, f"--balance_factor must be >= 1, got {loss.balance_factor}")
    return capped_subset(ds["train"], info.train_counts, loss.balance_factor, seed=loss.subset_seed,
                         selection=loss.subset_selection)


def k_shot(train_ds, shots, seed):
    """The train split, or up to `shots` seeded images per class of it (--head_init k_shot)."""
    return train_ds if shots is None else train_ds.select(k_shot_indices(train_ds["label"], shots, seed))


def k_shot_indices(labels, k, seed):
    """Up to k images per class, drawn by a seeded permutation of each class (LIFT's 1/10/100-shot class means)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)).tolist()


def resolve_augment(augment, on_device, cached_head):
    """The --augment a run trains with: rrc_flip by default; none for head-only training on cached features of the
    eval view (the backbone runs once), which cannot augment."""
    if cached_head:
        cached = "does not apply to --method head with cached features (computed once from the eval view)"
        require(augment in (None, "none"),
                f"--augment {augment} {cached}; drop --augment or pass --head_features augmented")
        require(not on_device, f"--augment_on_device {cached}; drop --augment_on_device or pass --head_features augmented")
        return "none"
    augment = augment or "rrc_flip"
    require(not on_device or augment == "rrc_flip", f"--augment_on_device resizes RandomResizedCrop views on the "
            f"accelerator (--augment rrc_flip), not --augment {augment}; drop --augment_on_device or use --augment rrc_flip")
    return augment


def on_device_augment(on_device, train_tf):
    """--augment_on_device: (the loader's per-sample transform, the batch transform for the accelerator), or
    (train_tf, None) without the flag. The boxes are drawn on the loader side from the same per-sample generators,
    so seeded determinism (resume, any number of processes or workers) is unchanged."""
    if not on_device:
        return train_tf, None
    return CropBoxes(train_tf), DeviceResizedCropFlip(train_tf)  # resolve_augment allowed rrc_flip only


def check_on_device_augment(loader):
    """Device augmentation batches the images at their own size: they must all have one (small images: CIFAR,
    Fashion-MNIST), which is what the loader's one-time decode holds."""
    split = loader.dataset
    require(split.array is not None, "--augment_on_device needs a split of small images of one size (decoded once "
            f"into memory, at most {SMALL_IMAGE_PIXELS} pixels each, such as CIFAR or Fashion-MNIST); these are decoded "
            "per read (larger or mixed sizes): drop --augment_on_device")
    return loader


def check_splits(ds, dataset, method):
    """The splits a run cannot do without, non-empty: checked once the data is built, before an earlier run is
    removed (train trains, test is evaluated at the end; without validation images a run keeps final/ only)."""
    for split in ("train", "test"):
        require(len(ds[split]) > 0, f"the {split} split of {dataset} is empty; pass data with {split} images (check "
                                    f"the data flags, e.g. --{split}_list, --max_per_class, --val_per_class)")


def head_on_cached_features(method):
    """Whether a spec.MethodSpec trains the head alone on features computed once."""
    return METHODS.get(method.method).head_only and method.head_features == "cached"


def image_transforms(spec, augment="rrc_flip"):
    """(train, eval) transforms from the checkpoint's preprocessing; train ones are called (image, generator).

    augment: rrc_flip (LIFT: RandomResizedCrop + flip), crop_flip (CIFAR papers, LOS: 4-px padded random crop + flip), flip (the eval view, randomly mirrored; small images trained
    from scratch), none (the eval view).
    """
    common = dict(image_size=spec.image_size, mean=spec.image_mean, std=spec.image_std, interpolation=spec.interpolation)
    eval_tf = build_eval_transform(**common, resize=getattr(spec, "eval_resize", None))
    train_tf = {"rrc_flip": lambda: build_train_transform(**common),
                "crop_flip": lambda: PaddedCropFlip(**common, resize=getattr(spec, "eval_resize", None)),
                "flip": lambda: RandomFlip(eval_tf),
                "none": lambda: NoAugment(eval_tf)}[augment]()
    return train_tf, eval_tf


def head_init_transform(spec):
    """The view of the training images a head init (class means, k-shot, linear probe) averages: LIFT's."""
    return build_plain_transform(spec.image_size, spec.image_mean, spec.image_std, spec.interpolation)


def test_transform(spec, data):
    """The test view of a spec.DataSpec (--tte with --tte_views / --tte_expand), in the backbone spec's interpolation
    unless --interpolation."""
    common = dict(image_size=spec.image_size, mean=spec.image_mean, std=spec.image_std,
                  interpolation=data.interpolation or spec.interpolation)
    resize = getattr(spec, "eval_resize", None)
    if data.tte == "none":
        return build_eval_transform(**common, resize=resize)
    return build_tte_transform(data.tte, patch_size=spec.patch_size, views=data.tte_views, expand=data.tte_expand,
                               resize=resize, **common)


def tte_tag(data):
    """The test view of a spec.DataSpec as one name, for records and output dirs: none, fivecrop, fivecrop_expand32,
    randaug10, ..."""
    if data.tte == "none":
        return "none"
    tag = data.tte + (str(data.tte_views) if data.tte == "randaug" else "")
    return tag + (f"_expand{data.tte_expand}" if data.tte_expand is not None and data.tte in ("fivecrop", "tencrop") else "")


def image_loader(dataset, transform, batch_size, num_workers, shuffle=False, sampler=None):
    """A loader of {"pixel_values", "labels"}; `transform` is a per-image transform or a SeededAugment (training).
    Workers stay alive across epochs (SeededAugment's epoch is shared with them)."""
    split = ImageSplit(dataset, transform, seeded=isinstance(transform, SeededAugment))
    return DataLoader(split, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, persistent_workers=num_workers > 0)


def build_sampler(sampler, train_ds, seed):
    """--sampler's sampler of the train split (None: the loader shuffles)."""
    if sampler == "random":
        return None
    power = 0.0 if sampler == "class_balanced" else 0.5
    return ClassBalancedSampler(train_ds["label"], power=power, seed=seed)


def collate_features(items):
    features, labels = zip(*items)
    return {"pixel_values": torch.stack(features), "labels": torch.stack(labels)}


@torch.no_grad()
def cache_features(lt_model, loader, accelerator, desc):
    """Frozen-backbone features of a whole split, computed once (head-only training must not re-run the backbone)."""
    from tqdm.auto import tqdm

    lt_model.eval()
    feats, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
        x = batch["pixel_values"]
        with accelerator.autocast():
            f = lt_model.features(x.flatten(0, 1)).view(*x.shape[:2], -1) if x.ndim == 5 else lt_model.features(x)
        f, y = accelerator.gather_for_metrics((f.float().contiguous(), batch["labels"]))
        feats.append(f.cpu())
        labels.append(y.cpu())
    if not feats:  # an empty split (no validation images): nothing to evaluate, nothing to stack
        return TensorDataset(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def feature_loader(features, batch_size, shuffle=False, sampler=None):
    return DataLoader(features, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=collate_features)
