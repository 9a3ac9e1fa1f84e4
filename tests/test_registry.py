"""One registry per axis: the CLI's choices are the registries' names, unknown names list the valid ones, and a new
fine-tuning method is one registry entry (a LayerNorm-tuning method defined here trains, exports, reloads through
checkpoint.build_from_meta, evaluates identically, resumes exactly and soups)."""
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers_cli import run_cli
from helpers_train import REPO, run_main, tiny_train_args

sys.path.insert(0, str(REPO))
import eval_lt  # noqa: E402
from lt_utils.checkpoint import build_from_meta, load_export  # noqa: E402
from lt_utils.config import build_train_parser  # noqa: E402
from lt_utils.errors import UserError  # noqa: E402
from lt_utils.head_init import HEAD_INITS  # noqa: E402
from lt_utils.heads import HEADS  # noqa: E402
from lt_utils.losses import LOSSES, build_loss  # noqa: E402
from lt_utils.models import BACKBONES  # noqa: E402
from lt_utils.peft_methods import METHODS, Method  # noqa: E402
from lt_utils.prompts import PROMPT_MODES  # noqa: E402
from lt_utils.registry import Registry  # noqa: E402
from lt_utils.transforms import TTE_MODES  # noqa: E402


def _choices(parser, dest):
    return parser._lt_flags[dest].choice_list()  # the flag table's choices, read from the registry when checked


def test_cli_choices_are_the_registry_names():
    train = build_train_parser()
    assert _choices(train, "method") == METHODS.names() == [
        "adaptformer", "lora", "full", "bitfit", "head", "full_all", "bitfit_all", "ln", "vpt_shallow", "vpt_deep", "adapter", "mask",
        "lora_mlp", "ssf_attn", "ssf_mlp", "ssf_ln"]
    assert _choices(train, "loss") == LOSSES.names() == ["ce", "la", "balanced_softmax", "focal", "ldam", "cb", "grw", "lade"]
    assert _choices(train, "head_type") == HEADS.names() == ["cosine", "linear", "l2_normed", "layer_normed"]
    assert _choices(train, "head_init") == HEAD_INITS.names() == ["text", "class_mean", "1_shot", "10_shot", "100_shot", "linear_probe", "random"]
    assert _choices(train, "prompt_template") == PROMPT_MODES.names() == ["single", "ensemble", "classname", "descriptor"]
    assert _choices(train, "tte") == ["none", *TTE_MODES.names()] == ["none", "fivecrop", "tencrop", "flip", "randaug"]
    evaluation = eval_lt.get_args_parser()
    assert _choices(evaluation, "prompt_template") == PROMPT_MODES.names()
    assert _choices(evaluation, "tte") == ["none", *TTE_MODES.names()]
    assert BACKBONES.names() == ["clip", "vit", "deit", "siglip", "dinov2", "cifar_resnet", "resnet"]


@pytest.mark.parametrize("registry,flag", [(METHODS, "--method"), (LOSSES, "loss"), (HEADS, "head type"),
                                           (HEAD_INITS, "--head_init"), (PROMPT_MODES, "prompt mode"),
                                           (TTE_MODES, "--tte"), (BACKBONES, "backbone kind")])
def test_unknown_name_lists_the_valid_ones(registry, flag):
    with pytest.raises(UserError) as err:
        registry.get("nope")
    assert str(err.value) == f"unknown {flag} 'nope'; choose one of {', '.join(registry.names())}"


def test_registry_refuses_a_second_entry_of_a_name():
    reg = Registry("thing")
    reg.register("a", 1)
    assert reg.register("b")(len) is len and list(reg) == ["a", "b"] and "b" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    reg.unregister("a")
    assert reg.names() == ["b"] and reg.get("b") is len
    with pytest.raises(UserError, match="unknown loss 'focal2'; choose one of ce, la, balanced_softmax"):
        build_loss("focal2")


def test_unknown_method_on_the_command_line_lists_the_choices():
    proc = run_cli("train_lt.py", "--method", "vpt", "--output_dir", "unused")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: --method vpt is not a valid choice; choose one of adaptformer, "
                                                    "lora, full, bitfit, head, full_all, bitfit_all, ln, vpt_shallow, vpt_deep, adapter, "
                                                    "mask, lora_mlp, ssf_attn, ssf_mlp, ssf_ln")


# ---- a new method is one registry entry ----------------------------------------------------------------------
def _is_layer_norm_key(key):
    return key.startswith("backbone.") and ("layernorm" in key or "layer_norm" in key)


class LayerNormTuning(Method):
    """Trains the backbone's LayerNorms (and the head): all a method has to say, in one class."""

    trains = "the backbone's LayerNorm weights and biases"

    def apply(self, model, **_):
        for module in model.backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
        return model

    def exports(self, key):
        return key.startswith("head.") or _is_layer_norm_key(key)


@pytest.fixture
def ln_method():
    entry = LayerNormTuning()
    METHODS.register("ln_test", entry)
    try:
        yield entry
    finally:
        METHODS.unregister("ln_test")


def test_a_method_registered_in_a_test_trains_exports_reloads_evaluates_identically_and_resumes(
        ln_method, idx_dir, vit_dir, tmp_path, capsys):
    from accelerate import Accelerator

    from lt_utils import data_loaders as D
    from lt_utils.data import load_lt_dataset
    from lt_utils.engine import evaluate
    from lt_utils.soup import make_soup, read_ingredient

    assert "ln_test" in _choices(build_train_parser(), "method")
    out = tmp_path / "run"
    # one epoch (10 steps), validated at its end: best/ is written from the in-memory model with its val metrics
    flags = ["--method", "ln_test", "--model_name_or_path", vit_dir, "--from_scratch", "false", "--num_train_epochs", "1",
             "--learning_rate", "0.01", "--checkpointing_steps", "4"]
    run_main(tiny_train_args(idx_dir, out, *flags))
    model, meta = load_export(out / "best")
    assert meta["method"] == "ln_test" and meta["arch"] == {"adapters": None, "adapter_dim": None, "lora": None}

    # the export holds exactly the head and the LayerNorms; they trained, the rest is the base checkpoint
    base = build_from_meta(meta).state_dict()
    stored = load_file(str(out / "best" / "lt_weights.safetensors"))
    assert set(stored) == {k for k in base if k.startswith("head.") or _is_layer_norm_key(k)}
    assert any(_is_layer_norm_key(k) for k in stored)
    assert all(not torch.equal(stored[k], base[k]) for k in stored if k.endswith("layernorm_before.weight"))
    reloaded = model.state_dict()
    assert all(torch.equal(reloaded[k], base[k]) for k in base if k not in stored)

    # the reloaded model gives the val metrics measured on the model in memory during training
    ds, info = load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, imb=10, max_per_class=40, val_per_class=5,
                               cache_dir=tmp_path / "hf_cache")
    loader = D.image_loader(ds["val"], D.image_transforms(model.spec)[1], 64, 0)
    val = evaluate(model, loader, Accelerator(cpu=True), info.groups, 10)
    recorded = load_export_metrics(out / "best")["val"]
    assert val["per_class_acc"] == recorded["per_class_acc"] and val["accuracy"] == recorded["accuracy"]
    assert val["nll"] == pytest.approx(recorded["nll"], rel=1e-5)

    # resumed from step 4, it ends with the same weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_4", resumed / "step_4")
    run_main(tiny_train_args(idx_dir, resumed, *flags, "--resume_from_checkpoint", "latest"))
    a, b = load_file(out / "final" / "lt_weights.safetensors"), load_file(resumed / "final" / "lt_weights.safetensors")
    assert a.keys() == b.keys() == stored.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)

    # soupable by default; an entry that says otherwise is refused by soup.py
    make_soup([out / "best", out / "final"], tmp_path / "soup", progress=False)
    assert load_export(tmp_path / "soup")[1]["method"] == "soup"
    ln_method.soupable = False
    with pytest.raises(UserError, match="--method ln_test, whose exports cannot be averaged"):
        read_ingredient(out / "best")

    # --init_from takes only the methods whose entry allows it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(tiny_train_args(idx_dir, tmp_path / "again", "--method", "ln_test", "--init_from", out / "best"))
    assert exit_info.value.code == 2
    assert "error: --init_from works with --method full/bitfit/head/full_all/bitfit_all/ln, not ln_test" in capsys.readouterr().err


def load_export_metrics(export_dir):
    import json

    return json.loads((export_dir / "metrics.json").read_text())
