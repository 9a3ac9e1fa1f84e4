"""SigLIP, DINOv2 and DeiT backbones: features equal transformers' own models' (same weights), preprocessing from the
image processor, LoRA / AdaptFormer counts on the base shapes by hand, SigLIP's text-initialised head and sigmoid
zero-shot against SiglipModel by hand, the methods each backbone refuses, and LoRA / head-only runs on
Fashion-MNIST-LT that export, reload and re-evaluate (eval_lt.py) to the recorded numbers."""
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers_models import (dinov2_base_config, make_tiny_dinov2, make_tiny_siglip, random_pixels,
                            siglip_base_config, write_config_only)
from helpers_cli import run_cli
from helpers_train import REPO, run_main, run_without_project, tiny_train_args

sys.path.insert(0, str(REPO))
from lt_utils.checkpoint import load_export  # noqa: E402
from lt_utils.errors import UserError  # noqa: E402
from lt_utils.head_init import text_head_init  # noqa: E402
from lt_utils.models import build_lt_model, load_backbone_config  # noqa: E402
from lt_utils.peft_methods import (apply_method, head_parameter_count, supported_methods,  # noqa: E402
                                   trainable_parameter_count)

CLASSES = ["cat", "maple_tree", "aquarium fish"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return make_tiny_siglip(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    # a 56-px position grid in the config, 32-px crops from the processor (dinov2-base: 518 / 224)
    return make_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2", config_image_size=56)


# ---------------------------------------------------------------------------------------------------- features
def features_and_classifier_input(reference, model, batch):
    """Our LTModel's features of random pixels, and what `reference` (a transformers *ForImageClassification)
    feeds its classifier on the same pixels."""
    captured = []
    reference.eval().classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    pixels = random_pixels(batch)
    with torch.no_grad():
        reference(pixel_values=pixels)
        return model.eval().features(pixels), captured[0]


def test_siglip_feature_is_siglipmodels_image_embedding(siglip_dir):
    from transformers import SiglipModel

    model, pixels = build_lt_model(siglip_dir, 3).eval(), random_pixels(4)
    full = SiglipModel.from_pretrained(siglip_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.features(pixels), full.get_image_features(pixel_values=pixels).pooler_output,
                                   rtol=0, atol=1e-6)
    assert model.head.weight.shape == (3, 32)


def test_siglip_without_pool_head_uses_siglipforimageclassifications_feature(tmp_path):
    """vision_use_head false: no attention-pool head, so the mean of last_hidden_state, as transformers' classifier."""
    from transformers import SiglipForImageClassification

    from helpers_models import tiny_siglip_config

    config = tiny_siglip_config(vision_use_head=False)
    torch.manual_seed(0)
    SiglipForImageClassification(config).save_pretrained(tmp_path / "cls")
    features, classifier_input = features_and_classifier_input(
        SiglipForImageClassification.from_pretrained(tmp_path / "cls"), build_lt_model(tmp_path / "cls", 2), 3)
    torch.testing.assert_close(features, classifier_input, rtol=0, atol=1e-6)


def test_dinov2_feature_is_dinov2forimageclassifications_linear_input(dinov2_dir):
    from transformers import Dinov2ForImageClassification

    model = build_lt_model(dinov2_dir, 3)
    features, classifier_input = features_and_classifier_input(
        Dinov2ForImageClassification.from_pretrained(dinov2_dir, num_labels=3), model, 2)
    torch.testing.assert_close(features, classifier_input, rtol=0, atol=1e-6)
    assert features.shape == (2, 64) and model.head.weight.shape == (3, 64)  # [CLS, patch mean]: 2 D


def test_preprocessing_and_geometry_come_from_the_image_processor(siglip_dir, dinov2_dir):
    siglip = build_lt_model(siglip_dir, 2).spec
    assert (siglip.kind, siglip.image_mean, siglip.image_std, siglip.interpolation) == ("siglip", [0.5] * 3, [0.5] * 3,
                                                                                        "bicubic")
    assert siglip.image_size == 32 and siglip.eval_resize == 32  # SigLIP's processor: whole image to 224, no crop
    dino = build_lt_model(dinov2_dir, 2).spec
    assert dino.kind == "dinov2" and dino.interpolation == "bicubic"
    assert dino.image_mean == pytest.approx([0.485, 0.456, 0.406]) and dino.image_std == pytest.approx([0.229, 0.224, 0.225])
    # the processor's 32-px crop of a 36-px shorter side (dinov2-base: 224 of 256), not the config's 56-px grid
    assert dino.image_size == 32 and dino.eval_resize == 36


def test_deit_trains_like_vit_with_the_cls_feature(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassification

    config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                        patch_size=8)
    torch.manual_seed(0)
    DeiTForImageClassification(config).save_pretrained(tmp_path / "deit")
    model = build_lt_model(tmp_path / "deit", 2)
    features, classifier_input = features_and_classifier_input(
        DeiTForImageClassification.from_pretrained(tmp_path / "deit"), model, 2)
    torch.testing.assert_close(features, classifier_input, rtol=0, atol=1e-6)
    assert trainable_parameter_count(apply_method(model, "lora", r=2)) == 2 * 2 * (32 * 2 + 2 * 32) + 2 * 32


# -------------------------------------------------------------------------------------------- counts by hand
@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    return {"siglip": write_config_only(root / "siglip", siglip_base_config()),
            "dinov2": write_config_only(root / "dinov2", dinov2_base_config())}


def _meta_model(config_dir, num_classes=100):
    with torch.device("meta"):  # base shapes without allocating weights
        return build_lt_model(config_dir, num_classes, from_scratch=True)


# 12 layers x (q, v) x (A: 768 x 4 + B: 4 x 768); AdaptFormer: 12 x (LN 2*768 + down 768*4+4 + up 4*768+768 + scale 1)
BASE_COUNTS = {"lora": 12 * 2 * (768 * 4 + 4 * 768), "adaptformer": 12 * (2 * 768 + 768 * 4 + 4 + 4 * 768 + 768 + 1)}


@pytest.mark.parametrize("kind,feature", [("siglip", 768), ("dinov2", 1536)])
@pytest.mark.parametrize("method", ["lora", "adaptformer"])
def test_base_shape_counts_by_hand(base_dirs, kind, feature, method):
    model = apply_method(_meta_model(base_dirs[kind]), method, r=4)
    head = head_parameter_count(model)
    assert head == 100 * feature  # cosine head: one row per class, no bias
    assert trainable_parameter_count(model) - head == BASE_COUNTS[method] == {"lora": 147_456, "adaptformer": 101_436}[method]


def test_dinov2_full_all_trains_every_used_weight(dinov2_dir):
    """Its mask token (masked-image modelling only) gets no gradient: trained, DDP would wait for it."""
    model = apply_method(build_lt_model(dinov2_dir, 3), "full_all").train()
    torch.nn.functional.cross_entropy(model(random_pixels(2)), torch.tensor([0, 2])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.embeddings.mask_token" not in trainable and "backbone.embeddings.cls_token" in trainable
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_siglip_lora_leaves_the_attention_pool_head_frozen(siglip_dir):
    """peft finds modules_to_save by name suffix; SigLIP's own `head` must not be copied, trained or exported."""
    model = apply_method(build_lt_model(siglip_dir, 3), "lora", r=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("base_model.model.head.") for n in trainable)
    assert not any("backbone.head.modules_to_save" in n for n, _ in model.named_modules())
    assert [n for n, _ in model.base_model.model.backbone.named_children()] == ["embeddings", "encoder",
                                                                                  "post_layernorm", "head"]
    # bitfit_all: every bias of the backbone, the pool head's attention in_proj_bias too
    biases = {n for n, p in apply_method(build_lt_model(siglip_dir, 3), "bitfit_all").named_parameters() if p.requires_grad}
    assert {"backbone.head.attention.in_proj_bias", "backbone.head.mlp.fc2.bias", "head.weight"} <= biases


def test_unsupported_methods_and_model_types_name_the_supported_set(siglip_dir, dinov2_dir, tmp_path):
    for path, kind in ((siglip_dir, "siglip"), (dinov2_dir, "dinov2")):
        supported = ", ".join(supported_methods(kind))
        with pytest.raises(UserError, match=re.escape(f"--method vpt_deep does not apply to {kind} backbones; choose one of "
                                                      f"{supported}") + "$"):
            apply_method(build_lt_model(path, 2), "vpt_deep")
        assert "vpt_shallow" not in supported_methods(kind) and "adapter" in supported_methods(kind)
    from transformers import BeitConfig

    BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"is a 'beit' model; supported model types: \[.*'dinov2'.*'siglip'"):
        load_backbone_config(tmp_path)
    with pytest.raises(UserError, match="text towers: clip, siglip.*class_mean"):
        text_head_init(dinov2_dir, CLASSES)


# ---------------------------------------------------------------------------------------------- SigLIP text
def _siglip_text_by_hand(path, names, templates):
    from transformers import AutoTokenizer, SiglipModel

    full, tokenizer = SiglipModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = []
    with torch.no_grad():
        for name in names:
            ids = tokenizer([t.format(name) for t in templates], padding="max_length", max_length=16,
                            return_tensors="pt")
            embeds = full.get_text_features(input_ids=ids["input_ids"]).pooler_output
            rows.append(F.normalize(F.normalize(embeds, dim=-1).mean(0), dim=-1))
    return full, torch.stack(rows)


def test_siglip_text_head_init_is_get_text_features(siglip_dir):
    templates = ["a photo of a {}.", "itap of the {}."]
    weight = text_head_init(siglip_dir, CLASSES, prompts=templates, batch_size=3, device="cpu")
    _, expected = _siglip_text_by_hand(siglip_dir, ["cat", "maple tree", "aquarium fish"], templates)
    assert weight.shape == (3, 32)
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-5)
    # padded to max_length, as SigLIP was trained: padding to the batch gives other embeddings (last-token pooling)
    from transformers import AutoTokenizer, SiglipModel

    full, tokenizer = SiglipModel.from_pretrained(siglip_dir).eval(), AutoTokenizer.from_pretrained(siglip_dir)
    with torch.no_grad():
        short = full.get_text_features(**tokenizer(["a photo of a cat."], padding=True, return_tensors="pt")).pooler_output
    assert (F.normalize(short, dim=-1)[0] - expected[0]).abs().max() > 1e-3


def test_siglip_zero_shot_is_its_sigmoid_logits(siglip_dir):
    from lt_utils.zeroshot import build_zero_shot

    pixels = random_pixels(4)
    model = build_zero_shot(siglip_dir, CLASSES, "single")
    full, text = _siglip_text_by_hand(siglip_dir, ["cat", "maple tree", "aquarium fish"], ["a photo of a {}."])
    with torch.no_grad():
        image = F.normalize(full.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        expected = full.logit_scale.exp() * image @ text.t() + full.logit_bias
        logits = model(pixels)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert float(model.logit_bias) == pytest.approx(-3.0) and float(model.logit_scale) == pytest.approx(torch.tensor(2.3).exp().item())
    # one bias for every class: the sigmoid probabilities rank classes as the logits do
    assert torch.equal(torch.sigmoid(logits).argmax(-1), logits.argmax(-1))
    assert model.spec.kind == "siglip" and model.spec.interpolation == "bicubic"


# ------------------------------------------------------------------------------------------- end to end
RUNS = [("siglip", "lora", "text"), ("siglip", "head", "text"), ("dinov2", "lora", "class_mean"),
        ("dinov2", "head", "random"), ("dinov2", "adaptformer", "random")]


def train_run(kind, method, head_init, idx_dir, base, out):
    run_main(tiny_train_args(idx_dir, out, "--model_name_or_path", base, "--from_scratch", "false", "--method", method,
                             "--head_init", head_init, "--max_train_steps", "4", "--eval_steps", "4",
                             "--learning_rate", "0.01"))
    return out


@pytest.fixture(scope="module")
def lora_runs(idx_dir, siglip_dir, dinov2_dir, tmp_path_factory):
    """The LoRA runs, shared with the card-snippet test (one client interpreter for both)."""
    root = tmp_path_factory.mktemp("lora_runs")
    return {kind: train_run(kind, method, head_init, idx_dir, siglip_dir if kind == "siglip" else dinov2_dir,
                            root / kind / "run") for kind, method, head_init in RUNS if method == "lora"}


@pytest.mark.parametrize("kind,method,head_init", RUNS, ids=[f"{k}-{m}" for k, m, _ in RUNS])
def test_trains_exports_reloads_and_evaluates_identically(kind, method, head_init, idx_dir, siglip_dir, dinov2_dir,
                                                          tmp_path, monkeypatch, request):
    base = siglip_dir if kind == "siglip" else dinov2_dir
    out = request.getfixturevalue("lora_runs")[kind] if method == "lora" else \
        train_run(kind, method, head_init, idx_dir, base, tmp_path / "run")
    model, meta = load_export(out / "best")
    assert meta["backbone"]["kind"] == kind and meta["method"] == method
    assert (out / "best" / "model.safetensors").is_file()  # every tensor, LoRA merged in
    assert (out / "best" / "adapter" / "adapter_model.safetensors").is_file() == (method == "lora") == meta["adapter"]
    # the same export by Hub id (a local folder stands in for the downloaded snapshot): the same logits
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(out / "best"))
    from_hub, _ = load_export("you/tiny-lt")
    pixels = random_pixels(3)
    with torch.no_grad():
        torch.testing.assert_close(from_hub(pixels), model(pixels), rtol=0, atol=0)
    if head_init == "text":  # the export's anchor is the text init, computed again by hand
        from safetensors.torch import load_file

        fashion = [meta["id2label"][str(i)] for i in range(meta["num_labels"])]
        _, expected = _siglip_text_by_hand(base, [n.replace("_", " ") for n in fashion], ["a photo of a {}."])
        torch.testing.assert_close(load_file(str(out / "best" / "head_init.safetensors"))["weight"], expected,
                                   rtol=0, atol=1e-5)
    # eval_lt.py's command line on the run dir (its best/): the numbers train_lt.py recorded, exactly
    proc = run_cli("eval_lt.py", out, "--split", "test", "--per_device_eval_batch_size", "64",
                   "--data_dir", idx_dir, "--cache_dir", tmp_path / "hf_cache", "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "best" / "eval_test" / "metrics.json").read_text())["metrics"]
    recorded = json.loads((out / "best" / "metrics.json").read_text())["test"]
    assert saved == recorded and saved["num_samples"] == 100


CLIENT = r'''
out = {}
for kind, snippets in cfg["snippets"].items():
    for key, code in snippets.items():
        scope = {}
        exec(code, scope)
        out[f"{kind}/{key}"] = scope["logits"].tolist()
Path(cfg["out"]).write_text(json.dumps(out))
'''


@pytest.mark.slow  # a fresh interpreter without this project
def test_card_snippets_give_the_logits_without_this_project(lora_runs, siglip_dir, dinov2_dir, tmp_path):
    """The model card's snippets (remote-code model; peft adapter on the plain base + the saved head), ids replaced
    by local folders, in a process where lt_utils cannot be imported: the project's logits, for each backbone kind."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from lt_utils.hub import adapter_snippet, model_snippet

    Image.fromarray((torch.arange(40 * 36 * 3) % 251).reshape(40, 36, 3).numpy().astype("uint8")).save(tmp_path / "image.png")
    snippets = {}
    for kind, out in lora_runs.items():
        base, export = siglip_dir if kind == "siglip" else dinov2_dir, out / "best"
        codes = {"model_snippet": model_snippet("you/lt"),
                 "adapter_snippet": adapter_snippet("you/lt", "base/model", "cosine", kind)}
        snippets[kind] = {k: c.replace("base/model", str(base)).replace("you/lt", str(export)) for k, c in codes.items()}
    got = run_without_project(CLIENT, {"snippets": snippets}, tmp_path)
    for kind, out in lora_runs.items():
        model, _ = load_export(out / "best")
        pixels = AutoImageProcessor.from_pretrained(out / "best")(Image.open(tmp_path / "image.png"), return_tensors="pt")
        with torch.no_grad():
            ref = model(pixels["pixel_values"])
        # the remote-code model loads the very model.safetensors eval loads, and sees the same pixels: the same
        # logits (1e-6: another process's thread count may sum in another order); the peft adapter on the plain base
        # computes the unmerged LoRA (float rounding apart)
        for key, atol in (("model_snippet", 1e-6), ("adapter_snippet", 1e-5)):
            torch.testing.assert_close(torch.tensor(got[f"{kind}/{key}"]), ref, atol=atol, rtol=0, msg=f"{kind} {key}")


@pytest.mark.parametrize("kind", ["siglip", "dinov2"])
def test_presets_build_their_recipe_on_a_tiny_model(kind, idx_dir, siglip_dir, dinov2_dir, tmp_path, capsys):
    """The shipped preset, its model and data swapped for tiny offline ones: AdaptFormer counted by hand."""
    base = siglip_dir if kind == "siglip" else dinov2_dir
    run_main(["--config", str(REPO / "configs" / f"{kind}_cifar100_lt.yaml"), "--dataset", "fashion_mnist_lt",
              "--data_dir", str(idx_dir), "--imb", "10", "--max_per_class", "40", "--val_per_class", "5",
              "--model_name_or_path", str(base), "--output_dir", str(tmp_path / "never"), "--num_workers", "0",
              "--cache_dir", str(tmp_path / "hf_cache"), "--total_batch_size", "16", "--dry_run"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    feature = 32 if kind == "siglip" else 64
    # LIFT's r = 2 (10 classes, 2 layers); per layer LN 2*32 + down 32*2+2 + up 2*32+32 + scale 1
    assert counts["method"] == "adaptformer" and counts["backbone_kind"] == kind
    assert counts["head"] == 10 * feature and counts["backbone"] == 2 * (64 + 66 + 96 + 1)
    assert not (tmp_path / "never").exists()
