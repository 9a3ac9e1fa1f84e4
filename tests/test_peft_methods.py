"""Fine-tuning methods: parameter counts on ViT-B/16 shapes, AdaptFormer wiring, LoRA, trainable sets, exports."""
import copy
import re

import pytest
import torch
from torch import nn

from lt_utils.errors import UserError
from lt_utils.heads import fingerprint
from lt_utils.methods import method_config
from lt_utils.models import build_lt_model
from lt_utils.peft_methods import (
    AdaptFormer,
    apply_method,
    bottleneck_dim,
    encoder_layers,
    merge_lora_state_dict,
    trainable_parameter_count,
    unwrap_lt_model,
)
from tests.helpers_models import (
    random_pixels,
    vit_b16_clip_config,
    vit_b16_vit_config,
    write_config_only,
)




@pytest.fixture(scope="module", params=["clip", "vit"])
def tiny_dir(request, clip_dir, vit_dir):
    return clip_dir if request.param == "clip" else vit_dir


def _meta_model(config_dir, num_classes=100):
    with torch.device("meta"):  # ViT-B/16 shapes without allocating or downloading weights
        return build_lt_model(config_dir, num_classes, from_scratch=True)


# ---- trainable parameter counts of ViT-B/16 on 100 classes, worked out by hand ----------------------------


@pytest.mark.parametrize("config_fn", [vit_b16_clip_config, vit_b16_vit_config], ids=["clip", "vit"])
def test_parameter_counts_vit_b16(tmp_path, config_fn):
    config_dir = write_config_only(tmp_path / "b16", config_fn())
    head = 100 * 768
    counts = {m: trainable_parameter_count(apply_method(_meta_model(config_dir), m))
              for m in ("head", "adaptformer", "lora", "full_all", "full")}
    assert head == 76_800 and counts["head"] == head
    assert counts["adaptformer"] - head == 101_436  # 12 * (2*768*4 + 4 + 3*768 + 1), r=4 from the rule
    assert counts["lora"] - head == 147_456  # 12 * 4*768*4 (q and v)
    assert counts["full_all"] - head == sum(p.numel() for p in _meta_model(config_dir).backbone.parameters())
    assert counts["full"] - head == 85_054_464  # LIFT: the 12 blocks only


@pytest.mark.parametrize("k,r", [(100, 4), (365, 8), (1000, 32), (8142, 256), (10, 1), (48, 2), (47, 1)])
def test_bottleneck_rule(k, r):
    assert bottleneck_dim(k, 12) == r


def test_bottleneck_rule_vit_l():
    assert (bottleneck_dim(1000, 24), bottleneck_dim(8142, 24)) == (16, 128)


# ---- trainable sets ---------------------------------------------------------------------------------------


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_requires_grad_per_method(clip_dir):
    names = lambda m: {n for n, _ in m.named_parameters()}  # noqa: E731
    head = {"head.weight"}
    model = apply_method(build_lt_model(clip_dir, 3), "head")
    assert _trainable(model) == head
    model = apply_method(build_lt_model(clip_dir, 3), "full_all")
    assert _trainable(model) == names(model)
    model = apply_method(build_lt_model(clip_dir, 3), "full")  # LIFT: the blocks only
    assert _trainable(model) == {n for n in names(model) if n.startswith("backbone.encoder.layers.")} | head
    model = apply_method(build_lt_model(clip_dir, 3), "bitfit")
    biases = {n for n in names(model) if n.startswith("backbone.encoder.layers.") and n.endswith(".bias")}
    assert "backbone.encoder.layers.0.self_attn.q_proj.bias" in biases
    assert "backbone.post_layernorm.bias" not in _trainable(model)  # LIFT: biases of the blocks
    assert _trainable(model) == biases | head
    model = apply_method(build_lt_model(clip_dir, 3), "adaptformer")
    assert _trainable(model) == {n for n in names(model) if n.startswith("adapters.")} | head
    lora = apply_method(build_lt_model(clip_dir, 3), "lora")
    trainable = _trainable(lora)
    assert trainable and all("lora_" in n or ".head.modules_to_save." in n for n in trainable)
    assert any(".head.modules_to_save.default.weight" in n for n in trainable)


def test_methods_on_a_model_that_already_has_adapters(clip_dir):
    """An AdaptFormer export rebuilt, then trained further: stage-2 head only, full, or the adapters again."""

    def rebuilt():
        return apply_method(build_lt_model(clip_dir, 3), "adaptformer", r=2)

    adapters = {n for n, _ in rebuilt().named_parameters() if n.startswith("adapters.")}
    assert _trainable(apply_method(rebuilt(), "head")) == {"head.weight"}
    full = apply_method(rebuilt(), "full_all")
    assert adapters <= _trainable(full) and "backbone.post_layernorm.weight" in _trainable(full)
    full = apply_method(rebuilt(), "full")
    assert adapters <= _trainable(full) and "backbone.post_layernorm.weight" not in _trainable(full)
    assert not adapters & _trainable(apply_method(rebuilt(), "bitfit"))
    model = rebuilt()
    down = fingerprint(model.adapters[0].down.weight)
    again = apply_method(apply_method(model, "head"), "adaptformer", r=2, seed=9)
    assert _trainable(again) == adapters | {"head.weight"} and len(again.adapters) == 2
    assert fingerprint(again.adapters[0].down.weight) == down  # kept, not re-initialised
    with pytest.raises(UserError, match="r=2, not 4"):
        apply_method(rebuilt(), "adaptformer", r=4)
    with pytest.raises(TypeError):
        apply_method(apply_method(build_lt_model(clip_dir, 3), "lora"), "head")


def test_unknown_method_and_bad_rank(clip_dir):
    with pytest.raises(UserError, match="unknown --method 'prompt'"):
        apply_method(build_lt_model(clip_dir, 3), "prompt")
    with pytest.raises(UserError, match="r must be >= 1"):
        apply_method(build_lt_model(clip_dir, 3), "adaptformer", r=0)


# ---- AdaptFormer ------------------------------------------------------------------------------------------


def test_adaptformer_init():
    adapter = AdaptFormer(16, 4)
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert torch.count_nonzero(adapter.down.bias) == 0 and adapter.scale.item() == 1.0
    # Kaiming-normal with a=sqrt(5): std = sqrt(2 / (1 + 5)) / sqrt(fan_in)
    big = AdaptFormer(4096, 64)
    assert big.down.weight.std().item() == pytest.approx((1 / 3) ** 0.5 / 4096**0.5, rel=0.02)


def test_untrained_adapters_and_lora_leave_logits_unchanged(tiny_dir):
    x = random_pixels(2)
    plain = build_lt_model(tiny_dir, 3).eval()
    with torch.no_grad():
        reference = plain(x)
        for method in ("adaptformer", "lora"):
            model = apply_method(build_lt_model(tiny_dir, 3), method, r=2).eval()
            torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def _perturb(params, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_adaptformer_matches_hand_computed_layer(tiny_dir):
    """out = h + MLP(LN2(h)) + s * Up(ReLU(Down(LN_a(h)))), with h the residual stream after attention."""
    model = apply_method(build_lt_model(tiny_dir, 3), "adaptformer", r=2).eval()
    _perturb([model.adapters[0].up.weight, model.adapters[0].up.bias])
    with torch.no_grad():
        model.adapters[0].scale.fill_(0.5)
        x = random_pixels(2)
        hidden = model.backbone(pixel_values=x, output_hidden_states=True).hidden_states
        layer, norm2, mlp = encoder_layers(model.backbone)[0]
        attn_ln = layer.layer_norm1 if hasattr(layer, "layer_norm1") else layer.layernorm_before
        attn = layer.self_attn if hasattr(layer, "self_attn") else layer.attention
        x0 = hidden[0]
        h = x0 + attn(attn_ln(x0), None)[0]
        a = model.adapters[0]
        adapter_term = 0.5 * a.up(torch.relu(a.down(a.norm(h))))
        saved = dict(mlp._forward_hooks)
        mlp._forward_hooks.clear()  # the plain MLP branch, without the adapter
        try:
            mlp_out = mlp(norm2(h))
        finally:
            mlp._forward_hooks.update(saved)
        expected = h + mlp_out + adapter_term
    assert adapter_term.abs().max() > 1e-3
    torch.testing.assert_close(hidden[1], expected, atol=1e-5, rtol=1e-5)


def test_adaptformer_keeps_backbone_keys_and_trains(clip_dir):
    plain_keys = set(build_lt_model(clip_dir, 3).state_dict())
    model = apply_method(build_lt_model(clip_dir, 3), "adaptformer", r=2)
    keys = set(model.state_dict())
    assert plain_keys <= keys
    assert keys - plain_keys == {k for k in keys if k.startswith("adapters.")}
    assert len(model.adapters) == 2
    model(random_pixels(2)).sum().backward()
    assert model.adapters[1].up.weight.grad.abs().sum() > 0  # gradient reaches the zero-initialised Up
    assert all(p.grad is None for p in model.backbone.parameters())


def test_adaptformer_under_activation_checkpointing(clip_dir):
    """Recomputed layers re-run the hooks; gradients must match the plain run."""

    def adapter_grads(checkpointing):
        model = apply_method(build_lt_model(clip_dir, 3), "adaptformer", r=2, seed=1).train()
        _perturb([a.up.weight for a in model.adapters])
        calls = []
        # A pre-hook: the recompute stops as soon as the last saved tensor is rebuilt, before any post-hook.
        model.adapters[0].register_forward_pre_hook(lambda *_: calls.append(1))
        if checkpointing:
            model.backbone.activation_checkpointing_enable({"use_reentrant": False})
        model(random_pixels(2)).logsumexp(-1).sum().backward()
        return [p.grad for p in model.adapters.parameters()], len(calls)

    plain, plain_calls = adapter_grads(False)
    ckpt, ckpt_calls = adapter_grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the checkpointed layer really was recomputed
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


def test_adaptformer_deepcopy_rebinds_hooks(vit_dir):
    model = apply_method(build_lt_model(vit_dir, 3), "adaptformer", r=2).eval()
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    x = random_pixels(2)
    with torch.no_grad():
        before = model(x)
        _perturb([twin.adapters[0].up.weight])
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        assert (twin(x) - before).abs().max() > 1e-4


def test_adapter_and_lora_init_follow_seed(clip_dir):
    def down(seed):
        model = apply_method(build_lt_model(clip_dir, 3), "adaptformer", seed=seed)
        return fingerprint(model.adapters[0].down.weight)

    assert down(0) == down(0) != down(1)

    def lora_a(seed):
        model = apply_method(build_lt_model(clip_dir, 3), "lora", seed=seed)
        return fingerprint(next(p for n, p in model.named_parameters() if "lora_A" in n))

    assert lora_a(0) == lora_a(0) != lora_a(1)


# ---- LoRA -------------------------------------------------------------------------------------------------


def test_lora_targets_and_parity_config(clip_dir, vit_dir):
    for path in (clip_dir, vit_dir):
        model = apply_method(build_lt_model(path, 3), "lora")
        config = model.peft_config["default"]
        assert (config.r, config.lora_alpha, config.lora_dropout) == (1, 1.0, 0.0)  # K=3, L=2 -> r=1
        lora_modules = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
        assert len(lora_modules) == 4
        assert all(".backbone." in n and n.endswith(("q_proj", "v_proj")) for n in lora_modules)
        assert unwrap_lt_model(model).spec.name_or_path == str(path)


def test_lora_custom_targets_and_changes_output(clip_dir):
    model = apply_method(build_lt_model(clip_dir, 3), "lora", r=2, lora_alpha=4.0, lora_target_modules="fc1,out_proj")
    lora_modules = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_modules) == ["fc1", "fc1", "out_proj", "out_proj"]
    x = random_pixels(2)
    model.eval()
    with torch.no_grad():
        before = model(x)
        _perturb([p for n, p in model.named_parameters() if "lora_B" in n])
        assert (model(x) - before).abs().max() > 1e-4
    with pytest.raises(UserError, match=r"\['query'\] are not Linear layers"):
        apply_method(build_lt_model(clip_dir, 3), "lora", lora_target_modules=["query"])


def test_lora_gradients_reach_adapters_and_head(vit_dir):
    model = apply_method(build_lt_model(vit_dir, 3), "lora", r=2)
    _perturb([p for n, p in model.named_parameters() if "lora_B" in n])
    model(random_pixels(2)).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert any("head.modules_to_save" in n for n in grads)


def test_unwrap_lt_model(clip_dir):
    base = build_lt_model(clip_dir, 3)
    assert unwrap_lt_model(base) is base
    ddp_like = nn.Module()
    ddp_like.module = apply_method(base, "lora")
    assert unwrap_lt_model(ddp_like) is base
    with pytest.raises(TypeError):
        unwrap_lt_model(nn.Linear(2, 2))


# ---- exports ----------------------------------------------------------------------------------------------
# (which tensors each method trains: test_requires_grad_per_method; an export holds every tensor of the model)


def test_export_holds_every_tensor_once_and_reloads_exactly(vit_dir, tmp_path):
    """An AdaptFormer export written by Exporter.write and read by load_export (from_pretrained of the folder alone):
    model.safetensors holds each LTModel tensor once, the frozen backbone as the base has it, the trained adapters and
    head as trained; the reloaded model gives the trained model's logits exactly."""
    from safetensors.torch import load_file

    from lt_utils.checkpoint import load_export, read_export_config, weight_keys
    from tests.helpers_soup import write_ingredient

    config = method_config("adaptformer", 3, 2, r=2)
    trained = apply_method(build_lt_model(vit_dir, 3), config).eval()
    head_init = trained.head.weight.detach().clone()
    _perturb([p for n, p in trained.named_parameters() if n.startswith(("adapters.", "head."))])
    export = write_ingredient(tmp_path / "af", trained, vit_dir, {}, head_init, method=config)
    files = load_file(str(export / "model.safetensors"))
    names = weight_keys(read_export_config(export))  # ViT keys are saved under transformers' original names
    state, base = trained.state_dict(), build_lt_model(vit_dir, 3).state_dict()
    assert set(files) == set(names) and sorted(names.values()) == sorted(state)  # every tensor, once
    stored = {names[k]: v for k, v in files.items()}
    for key, value in stored.items():
        assert torch.equal(value, base[key] if key.startswith("backbone.") else state[key]), key
    assert not torch.equal(stored["head.weight"], head_init)
    assert torch.equal(load_file(str(export / "head_init.safetensors"))["weight"], head_init)
    reloaded, record = load_export(export)
    assert record["method_config"] == {"name": "adaptformer", "r": 2, "partial_layers": None}
    assert len(reloaded.adapters) == 2
    x = random_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), trained(x), rtol=0, atol=0)

    # the recorded config is what rebuilds the modules: another r builds r=4 adapters, which the r=2 weights do not fit
    path = export / "config.json"
    path.write_text(path.read_text().replace('"r": 2', '"r": 4'))
    with pytest.raises(UserError, match=re.escape("do not match its config.json (6 tensors, e.g. ('lt.adapters.0.down.bias', "
                                                  "torch.Size([2]), torch.Size([4])))")):
        load_export(export)

    # a method trained on top of it (--init_from) keeps its record as "base": the modules come from there, whatever
    # the new method's own settings
    from lt_utils.modeling_lt import lt_model_from_config

    config = read_export_config(export)
    config.method = {"name": "full", "partial_layers": 1, "base": {**config.method, "r": 2}}
    rebuilt = lt_model_from_config(config)
    assert len(rebuilt.adapters) == 2 and rebuilt.adapters[0].down.out_features == 2


def test_merge_lora_state_dict_is_the_peft_model(clip_dir):
    """The LoRA export's weights: base + (B @ A) * alpha / r in each target, peft's trained head copy; a plain LTModel
    holding them gives the peft model's logits. The factors keep LTModel module names."""
    model = apply_method(build_lt_model(clip_dir, 3), "lora", r=2, lora_alpha=4.0)
    _perturb([p for n, p in model.named_parameters() if p.requires_grad])  # A, B and the head copy
    config = model.peft_config["default"]
    merged, lora = merge_lora_state_dict(model.state_dict(), config)
    base = build_lt_model(clip_dir, 3)
    assert set(merged) == set(base.state_dict())
    targets = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert len(targets) == 4 and set(lora) == {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    params = dict(model.named_parameters())
    for key, value in merged.items():
        module = key.removesuffix(".weight")
        if module in targets:
            a, b = (params[f"base_model.model.{module}.lora_{ab}.default.weight"] for ab in "AB")
            assert torch.equal(lora[f"{module}.lora_A.weight"], a) and torch.equal(lora[f"{module}.lora_B.weight"], b)
            assert torch.equal(value, base.state_dict()[key] + (b @ a) * (4.0 / 2)), key
        elif key == "head.weight":
            assert torch.equal(value, params["base_model.model.head.modules_to_save.default.weight"])
            assert not torch.equal(value, base.state_dict()[key])
        else:
            assert torch.equal(value, base.state_dict()[key]), key
    base.load_state_dict(merged, strict=True)
    x = random_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(x), model.eval()(x), rtol=0, atol=1e-5)
