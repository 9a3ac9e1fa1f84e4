"""The choice lists of the command lines whose code imports torch, transformers or datasets, declared here without them
so the flag table (and so --help) reads the live lists at once. Each is defined here only; the module that uses it
imports it from here (`lt_utils.losses.LOSSES` is this LOSSES). A registry's built-in entries are named "module:attr"
and imported on first use (lt_utils/registry.py); `@LOSSES.register("x")` adds more.

Relative names on purpose: heads.py ships with every export (modeling_lt.py) and brings this file along.
"""
from .registry import Registry

# `--loss`: f(train_counts, options) -> module(logits, labels) (lt_utils/losses.py)
LOSSES = Registry("loss", package=__package__, declared={
    "ce": ".losses:_cross_entropy", "la": ".losses:_logit_adjusted", "balanced_softmax": ".losses:_balanced_softmax",
    "focal": ".losses:_focal", "ldam": ".losses:_ldam", "cb": ".losses:_class_balanced",
    "grw": ".losses:_generalized_reweight", "lade": ".losses:_lade"})

# `--head_type`: classes built as cls(num_classes, dim, scale=..., seed=...), weights seeded by random_head_init
HEADS = Registry("head", flag="head type", package=__package__, declared={
    "cosine": ".heads:CosineHead", "linear": ".heads:LinearHead", "l2_normed": ".heads:L2NormedHead",
    "layer_normed": ".heads:LayerNormedHead"})

# `--head_init`: f(model, info, lt_model, accelerator, train_loader_fn) -> the head weight [C, D] (head_init.py)
HEAD_INITS = Registry("head init", flag="--head_init", package=__package__, declared={
    "text": ".head_init:_text", "class_mean": ".head_init:_class_mean", "1_shot": ".head_init:_1_shot",
    "10_shot": ".head_init:_10_shot", "100_shot": ".head_init:_100_shot", "linear_probe": ".head_init:_linear_probe",
    "random": ".head_init:_random"})

# `--tte`: f(TTEViews) -> a transform of one image to its [V, 3, H, W] views (logits are averaged over V)
TTE_MODES = Registry("TTE mode", flag="--tte", package=__package__, declared={
    "fivecrop": ".transforms:_five_crop", "tencrop": ".transforms:_ten_crop", "flip": ".transforms:_flip",
    "randaug": ".transforms:_random_views"})

# soup.py --merge_method: a MergeMethod (lt_utils/merge.py)
MERGE_METHODS = Registry("merge method", flag="--merge_method", package=__package__, declared={
    "average": ".merge:AVERAGE", "task_arithmetic": ".merge:TASK_ARITHMETIC", "ties": ".merge:TIES",
    "dare_linear": ".merge:DARE_LINEAR", "dare_ties": ".merge:DARE_TIES"})
# soup modes: which ingredients, with which weights (lt_utils.soup.soup_weights); the merge method combines them
MODES = ("uniform", "weighted", "progressive", "greedy")
SIGN_METHODS = ("total", "frequency")  # ties / dare_ties: how the sign of an entry is elected

SELECTION_MODES = ("rng", "lift", "first")  # which images fill each class (lt_utils.data.counts)
VAL_SOURCES = ("unused_train", "test_slice")  # where a dataset's validation split comes from (lt_utils.data.loading)
SPLITS = ("train", "validation", "test")  # every LT dataset's splits, named as transformers and the Hub name them
# split names of earlier versions -> the name now: read in saved splits and records, accepted as --split
LEGACY_SPLIT_NAMES = {"val": "validation"}

# --select_metric: the validation metrics that can pick best/ (lt_utils.metrics)
SELECTABLE = ("accuracy", "mean_class_acc", "many_acc", "medium_acc", "few_acc", "macro_f1", "worst_class_acc",
              "harmonic_mean_acc", "geometric_mean_acc", "nll", "many_nll", "medium_nll", "few_nll")
RUN_EXPORTS = ("best", "final")  # a run's export folders, in default order: best/ when validation kept one, else final/
