"""The choice lists `--help` shows while the modules that own them are not imported yet.

Those modules import torch, transformers, datasets or accelerate (tens of seconds on a busy machine), which `--help`
must not wait for. Values are always checked against the live lists (`lt_utils.config._lazy`); these copies only
print. tests/test_help.py fails when one differs from its source, and prints the line to paste here.
"""

# --method: what each built-in method trains (lt_utils.peft_methods, `Method.trains`), in registration order
METHOD_TRAINS = {
    "adaptformer": "AdaptFormer bottlenecks beside each MLP (r from LIFT's rule, or --adapter_dim)",
    "lora": "peft LoRA on q_proj,v_proj (--lora_target_modules), r from LIFT's rule, alpha 1",
    "full": "every weight of the transformer blocks (LIFT's full fine-tuning; embeddings and pre/post LN frozen)",
    "bitfit": "the biases of the transformer blocks (LIFT's BitFit)",
    "head": "the head only, on cached features (LOS / LT-Soups stage 2)",
    "full_all": "every weight (embeddings, blocks, pre/post LN, adapters of an --init_from export, head; LT-Soups)",
    "bitfit_all": "every bias of the backbone (embeddings and pre/post LN too; BatchNorm shifts of a CNN)",
    "ln": "the LayerNorms of the transformer blocks (weights and biases)",
    "vpt_shallow": "VPT-shallow: --vpt_len (10) prompt tokens before the first tuned block",
    "vpt_deep": "VPT-deep: --vpt_len (10) new prompt tokens before every tuned block",
    "adapter": "sequential bottleneck adapters after each MLP (r from LIFT's rule, or --adapter_dim)",
    "mask": "sparse fine-tuning: random entries of every Linear of the blocks (LIFT's ratio K/(12 L D), floored to "
            "0.001, or --mask_ratio; --mask_seed)",
    "lora_mlp": "peft LoRA on the two Linears of each MLP (fc1, fc2), r from LIFT's rule, alpha 1",
    "ssf_attn": "SSF scale and shift after the attention's q, k, v and output projections",
    "ssf_mlp": "SSF scale and shift after the MLP's two Linears",
    "ssf_ln": "SSF scale and shift after the blocks' two LayerNorms",
}

# "module.attribute" -> its names (a registry's names(), a constant, or what a function returns)
NAMES = {
    "lt_utils.peft_methods.METHODS": tuple(METHOD_TRAINS),
    "lt_utils.losses.LOSSES": ("ce", "la", "balanced_softmax", "focal", "ldam", "cb", "grw", "lade"),
    "lt_utils.heads.HEADS": ("cosine", "linear", "l2_normed", "layer_normed"),
    "lt_utils.head_init.HEAD_INITS": ("text", "class_mean", "1_shot", "10_shot", "100_shot", "linear_probe", "random"),
    "lt_utils.prompts.PROMPT_MODES": ("single", "ensemble", "classname", "descriptor"),
    "lt_utils.transforms.TTE_MODES": ("fivecrop", "tencrop", "flip", "randaug"),
    "lt_utils.peft_methods.LORA_INITS": ("peft", "lift"),
    "lt_utils.data.counts.SELECTION_MODES": ("rng", "lift", "first"),
    "lt_utils.data.loading.VAL_SOURCES": ("unused_train", "test_slice"),
    "lt_utils.data.builders.SPLITS": ("train", "val", "test"),
    "lt_utils.schedule.SCHEDULES": ("cosine", "cosine_epoch", "constant", "linear", "constant_with_warmup",
                                    "inverse_sqrt"),
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
