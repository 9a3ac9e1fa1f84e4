"""The choice lists `--help` shows while the modules that own them are not imported yet.

Those modules import torch, transformers, datasets or accelerate (tens of seconds on a busy machine), which `--help`
must not wait for. Values are always checked against the live lists (`lt_utils.config._lazy`); these copies only
print. tests/test_help.py fails when one differs from its source, and prints the line to paste here.
"""

# "module.attribute" -> its names (a registry's names(), a constant, or what a function returns)
NAMES = {
    "lt_utils.losses.LOSSES": ("ce", "la", "balanced_softmax", "focal", "ldam", "cb", "grw", "lade"),
    "lt_utils.heads.HEADS": ("cosine", "linear", "l2_normed", "layer_normed"),
    "lt_utils.head_init.HEAD_INITS": ("text", "class_mean", "1_shot", "10_shot", "100_shot", "linear_probe", "random"),
    "lt_utils.transforms.TTE_MODES": ("fivecrop", "tencrop", "flip", "randaug"),
    "lt_utils.data.counts.SELECTION_MODES": ("rng", "lift", "first"),
    "lt_utils.data.loading.VAL_SOURCES": ("unused_train", "test_slice"),
    "lt_utils.data.builders.SPLITS": ("train", "val", "test"),
    "lt_utils.metrics.SELECTABLE": ("accuracy", "mean_class_acc", "many_acc", "medium_acc", "few_acc", "macro_f1",
                                    "worst_class_acc", "harmonic_mean_acc", "geometric_mean_acc", "nll", "many_nll",
                                    "medium_nll", "few_nll"),
    "lt_utils.runs.RUN_EXPORTS": ("best", "final"),
    "lt_utils.protocols.PROTOCOLS": ("best_val", "final", "best_test", "ema_and_raw_val"),
    "lt_utils.merge.MODES": ("uniform", "weighted", "progressive", "greedy"),
    "lt_utils.merge.MERGE_METHODS": ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties"),
    "lt_utils.merge.SIGN_METHODS": ("total", "frequency"),
    "lt_utils.config._report_targets": ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml",
                                        "dvclive", "swanlab"),
}
