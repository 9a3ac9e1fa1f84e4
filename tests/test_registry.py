"""One registry per axis: the CLI's choices are the registries' names, unknown names list the valid ones, and a new
fine-tuning method is one registry entry (a LayerNorm-tuning method defined here trains, exports, reloads with
from_pretrained of its export, evaluates identically, resumes exactly and soups)."""
import dataclasses
import re
import shutil
import sys

import pytest
import torch
from torch import nn

from helpers_cli import run_cli
from helpers_train import REPO, assert_resumed_weights, export_tensors, run_main, tiny_train_args

sys.path.insert(0, str(REPO))
import eval_lt  # noqa: E402
from lt_utils.checkpoint import load_export  # noqa: E402
from lt_utils.config import build_train_parser  # noqa: E402
from lt_utils.errors import UserError  # noqa: E402
from lt_utils.head_init import HEAD_INITS  # noqa: E402
from lt_utils.heads import HEADS  # noqa: E402
from lt_utils.losses import LOSSES, build_loss  # noqa: E402
from lt_utils.merge import MERGE_METHODS, MergeMethod  # noqa: E402
from lt_utils.models import BACKBONES  # noqa: E402
from lt_utils.peft_modules import block_part, find_blocks, last_blocks  # noqa: E402
from lt_utils.methods import METHODS, MethodConfig, register_method, unregister_method  # noqa: E402
from lt_utils.prompts import PROMPT_MODES  # noqa: E402
from lt_utils.registry import Registry  # noqa: E402
from lt_utils.transforms import TTE_MODES  # noqa: E402


def _choices(parser, dest):
    return parser._lt_flags[dest].choice_list()  # the flag table's choices, read from the registry when checked


def test_cli_choices_are_the_registry_names():
    train = build_train_parser()
    assert _choices(train, "method") == METHODS.names()
    assert _choices(train, "loss") == LOSSES.names()
    assert _choices(train, "head_type") == HEADS.names()
    assert _choices(train, "head_init") == HEAD_INITS.names()
    assert _choices(train, "prompt_template") == PROMPT_MODES.names()
    assert _choices(train, "tte") == ["none", *TTE_MODES.names()]
    evaluation = eval_lt.get_args_parser()
    assert _choices(evaluation, "prompt_template") == PROMPT_MODES.names()
    assert _choices(evaluation, "tte") == ["none", *TTE_MODES.names()]
    # the built-in entries are registered (inclusion: a new entry, here or in a test, must not fail this)
    assert {"adaptformer", "lora", "full", "bitfit", "head", "full_all", "bitfit_all", "ln", "vpt_shallow", "vpt_deep",
            "adapter", "mask", "lora_mlp", "ssf_attn", "ssf_mlp", "ssf_ln"} <= set(METHODS)
    assert {"ce", "la", "balanced_softmax", "focal", "ldam", "cb", "grw", "lade"} <= set(LOSSES)
    assert {"cosine", "linear", "l2_normed", "layer_normed"} <= set(HEADS)
    assert {"text", "class_mean", "1_shot", "10_shot", "100_shot", "linear_probe", "random"} <= set(HEAD_INITS)
    assert {"single", "ensemble", "classname", "descriptor"} <= set(PROMPT_MODES)
    assert {"fivecrop", "tencrop", "flip", "randaug"} <= set(TTE_MODES) and "none" not in TTE_MODES
    assert {"clip", "vit", "deit", "siglip", "dinov2", "cifar_resnet", "resnet"} <= set(BACKBONES)


@pytest.mark.parametrize("registry,flag", [(METHODS, "--method"), (LOSSES, "loss"), (HEADS, "head type"),
                                           (HEAD_INITS, "--head_init"), (PROMPT_MODES, "prompt mode"),
                                           (TTE_MODES, "--tte"), (BACKBONES, "backbone kind")])
def test_unknown_name_lists_the_valid_ones(registry, flag):
    with pytest.raises(UserError) as err:
        registry.get("nope")
    assert str(err.value) == f"unknown {flag} 'nope'; choose one of {', '.join(registry.names())}"


@pytest.mark.parametrize("registry", [LOSSES, HEADS, HEAD_INITS, TTE_MODES, MERGE_METHODS], ids=lambda r: r.kind)
def test_declared_entries_resolve(registry):
    """Every entry lt_utils.axes declares by "module:attr" is imported on `get`: builders are callables, merge methods
    MergeMethods (a misspelt target fails here, not in a user's run)."""
    for name in registry:
        entry = registry.get(name)
        assert isinstance(entry, MergeMethod) if registry is MERGE_METHODS else callable(entry), name


def test_registry_refuses_a_second_entry_of_a_name():
    reg = Registry("thing")
    reg.register("a", 1)
    assert reg.register("b")(len) is len and list(reg) == ["a", "b"] and "b" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    reg.unregister("a")
    assert reg.names() == ["b"] and reg.get("b") is len
    with pytest.raises(UserError, match=re.escape(f"unknown loss 'focal2'; choose one of {', '.join(LOSSES.names())}")):
        build_loss("focal2")


def test_unknown_method_on_the_command_line_lists_the_choices():
    proc = run_cli("train_lt.py", "--method", "vpt", "--output_dir", "unused")
    assert proc.returncode == 2
    prefix = "error: --method vpt is not a valid choice; choose one of "
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix)
    # the registry's names in its order; entries registered only in this process (by a test) are not in the child's
    listed = last[len(prefix):].split(", ")
    assert listed == [name for name in METHODS.names() if name in listed] and {"adaptformer", "lora", "ssf_ln"} <= set(listed)


# ---- a new method is one registry entry ----------------------------------------------------------------------
def _is_layer_norm_key(key):
    return key.startswith("backbone.") and ("layernorm" in key or "layer_norm" in key)


def tune_layer_norms(model, config):
    """Trains the backbone's LayerNorms (and the head): all a method without settings has to say, besides one
    register call."""
    for module in model.backbone.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    return model


@pytest.fixture
def ln_method():
    entry = register_method("ln_test", MethodConfig, tune_layer_norms, trains="the backbone's LayerNorm weights and "
                                                                             "biases")
    try:
        yield entry
    finally:
        unregister_method("ln_test")


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
    assert meta["method_config"] == {"name": "ln_test", "partial_layers": None}

    # the export holds the whole model once; the head and the LayerNorms trained, the rest is the base checkpoint
    from lt_utils.models import build_lt_model

    base = build_lt_model(vit_dir, 10).state_dict()
    stored = export_tensors(out / "best")
    assert set(stored) == set(base)
    trained = {k for k in base if k.startswith("head.") or _is_layer_norm_key(k)}
    assert any(_is_layer_norm_key(k) for k in trained)
    assert all(not torch.equal(stored[k], base[k]) for k in trained if k.endswith("layernorm_before.weight"))
    reloaded = model.state_dict()
    assert all(torch.equal(reloaded[k], base[k]) and torch.equal(stored[k], base[k]) for k in base if k not in trained)

    # the reloaded model gives the val metrics measured on the model in memory during training
    ds, info = load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, imb=10, max_per_class=40, val_per_class=5,
                               cache_dir=tmp_path / "hf_cache")
    loader = D.image_loader(ds["validation"], D.image_transforms(model.spec)[1], 64, 0)
    val = evaluate(model, loader, Accelerator(cpu=True), info.groups, 10)
    recorded = load_export_metrics(out / "best")["validation"]
    assert val["per_class_acc"] == recorded["per_class_acc"] and val["accuracy"] == recorded["accuracy"]
    assert val["nll"] == pytest.approx(recorded["nll"], rel=1e-5)

    # resumed from step 4, it ends with the same weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_4", resumed / "step_4")
    run_main(tiny_train_args(idx_dir, resumed, *flags, "--resume_from_checkpoint", "latest"))
    a, b = export_tensors(out / "final"), export_tensors(resumed / "final")
    assert a.keys() == stored.keys()
    assert_resumed_weights(b, a)

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
    allowed = "/".join(name for name in METHODS if METHODS.get(name).init_from)
    assert f"error: --init_from works with --method {allowed}, not ln_test" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class GainConfig(MethodConfig):
    """A throw-away method with modules: a learned per-feature gain after the MLP of each tuned block."""

    gain_init: float = 1.0


def build_gains(lt_model, record, wiring):
    blocks, parts, _ = find_blocks(lt_model.backbone, wiring)
    gains = nn.ParameterList()
    for i, block in enumerate(last_blocks(blocks, record["partial_layers"])):
        fc2 = block_part(block, parts, "fc2")
        gains.append(nn.Parameter(torch.full((fc2.out_features,), float(record["gain_init"]))))
        # gains[i] looked up at each call: loading the weights replaces the parameter objects
        fc2.register_forward_hook(lambda module, args, out, i=i: out * gains[i])
    return gains


def test_a_method_with_modules_is_a_config_a_builder_and_one_register_call(idx_dir, vit_dir, tmp_path):
    """The README's example: registered here, trained one step through train_lt.py, exported, and rebuilt by
    from_pretrained from the recorded config alone; then unregistered without a trace."""
    from lt_utils.peft_modules import MODULES

    register_method("gain_test", GainConfig, modules=build_gains, trains="a per-feature gain after each tuned MLP")
    try:
        out = tmp_path / "run"
        result = run_cli("train_lt.py", *tiny_train_args(
            idx_dir, out, "--method", "gain_test", "--partial_layers", "1", "--model_name_or_path", vit_dir,
            "--from_scratch", "false", "--max_train_steps", "1", "--learning_rate", "0.05"))
        assert result.code == 0, result.err[-2000:]
        model, meta = load_export(out / "final")
        stored = export_tensors(out / "final")
    finally:
        unregister_method("gain_test")
    assert "gain_test" not in METHODS and "gain_test" not in MODULES
    assert meta["method_config"] == {"name": "gain_test", "partial_layers": 1, "gain_init": 1.0}
    assert [k for k in stored if k.startswith("adapters.")] == ["adapters.0"]  # the last of 2 blocks only
    assert len(model.adapters) == 1 and torch.equal(model.adapters[0].detach(), stored["adapters.0"])
    assert not torch.equal(stored["adapters.0"], torch.ones_like(stored["adapters.0"]))  # it trained
    with torch.no_grad():  # the rebuilt hook is live: a gain of 0 changes the logits
        x = torch.randn(2, 3, model.spec.image_size, model.spec.image_size, generator=torch.Generator().manual_seed(0))
        before = model(x)
        model.adapters[0].zero_()
        assert not torch.equal(model(x), before)


def load_export_metrics(export_dir):
    import json

    return json.loads((export_dir / "metrics.json").read_text())
