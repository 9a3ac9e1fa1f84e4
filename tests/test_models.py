"""Backbone loading, features, spec, heads and head initialisations on tiny offline checkpoints."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, CLIPModel, CLIPVisionModel, ViTModel

from lt_utils.errors import UserError
from lt_utils.head_init import class_mean_head_init, set_head_weight, text_head_init
from lt_utils.heads import HEADS, CosineHead, LayerNormedHead, L2NormedHead, LinearHead, fingerprint, random_head_init
from lt_utils.models import CLIP_MEAN, BackboneSpec, build_lt_model, load_backbone
from lt_utils.prompts import IMAGENET_TEMPLATES
from tests.helpers_models import make_tiny_clip, make_tiny_vit, random_pixels, write_config_only

CLASSES = ["cat", "maple_tree", "aquarium fish"]




# ---- backbones and features -------------------------------------------------------------------------------


def test_clip_feature_is_pooler_output_before_projection(clip_dir):
    model = build_lt_model(clip_dir, num_classes=3).eval()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    x = random_pixels(2)
    with torch.no_grad():
        feats = model.features(x)
        vision_out = clip.vision_model(pixel_values=x)
        # Post-LN CLS token: the last hidden state's CLS row through CLIP's final LayerNorm.
        post_ln_cls = clip.vision_model.post_layernorm(vision_out.last_hidden_state[:, 0])
        projected = clip.visual_projection(feats)
        clip_image_embeds = clip(pixel_values=x, input_ids=torch.tensor([[516, 517]])).image_embeds
    assert feats.shape == (2, 32)
    torch.testing.assert_close(feats, vision_out.pooler_output)
    torch.testing.assert_close(feats, post_ln_cls)
    torch.testing.assert_close(F.normalize(projected, dim=-1), clip_image_embeds)


def test_vit_feature_is_cls_of_last_hidden_state(vit_dir):
    model = build_lt_model(vit_dir, num_classes=3).eval()
    vit = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False).eval()
    x = random_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), vit(pixel_values=x).last_hidden_state[:, 0])
    assert model.backbone.pooler is None


def test_forward_applies_head_to_features(clip_dir):
    model = build_lt_model(clip_dir, num_classes=3, head_scale=25.0).eval()
    x = random_pixels(2)
    with torch.no_grad():
        logits = model(x)
        f, w = F.normalize(model.features(x), dim=-1), F.normalize(model.head.weight, dim=-1)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, 25.0 * f @ w.T)


def test_spec_from_processor_and_round_trip(clip_dir, vit_dir):
    _, clip_spec = load_backbone(clip_dir)
    assert (clip_spec.kind, clip_spec.hidden_size, clip_spec.num_layers) == ("clip", 32, 2)
    assert (clip_spec.image_size, clip_spec.patch_size, clip_spec.interpolation) == (32, 8, "bicubic")
    assert clip_spec.image_mean == pytest.approx(CLIP_MEAN)
    _, vit_spec = load_backbone(vit_dir)
    assert (vit_spec.kind, vit_spec.interpolation, vit_spec.image_std) == ("vit", "bilinear", [0.5, 0.5, 0.5])
    assert BackboneSpec.from_dict(clip_spec.to_dict()) == clip_spec
    with pytest.raises(UserError, match="unknown keys"):
        BackboneSpec.from_dict({**clip_spec.to_dict(), "extra": 1})


def test_spec_defaults_without_image_processor(tmp_path, clip_dir, vit_dir):
    for src, mean, interp in ((clip_dir, CLIP_MEAN, "bicubic"), (vit_dir, [0.5] * 3, "bilinear")):
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        (dst / "preprocessor_config.json").unlink()
        _, spec = load_backbone(dst)
        assert spec.image_mean == pytest.approx(mean) and spec.interpolation == interp


def test_vision_only_clip_checkpoint_loads(tmp_path, clip_dir):
    CLIPVisionModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "vision")
    backbone, spec = load_backbone(tmp_path / "vision")
    reference, _ = load_backbone(clip_dir)
    assert spec.kind == "clip"
    for (name, a), (_, b) in zip(backbone.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_from_scratch_is_seeded(tmp_path):
    config_dir = make_tiny_vit(tmp_path / "cfg", weights=False)
    a, _ = load_backbone(config_dir, from_scratch=True, seed=3)
    b, _ = load_backbone(config_dir, from_scratch=True, seed=3)
    c, _ = load_backbone(config_dir, from_scratch=True, seed=4)
    w = "embeddings.patch_embeddings.projection.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    with pytest.raises(UserError, match="from_scratch"):
        load_backbone(config_dir)  # a config-only dir has no weights to load


def test_bad_model_paths_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_backbone(tmp_path / "missing")
    bert = write_config_only(tmp_path / "bert", BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UserError, match="'bert'"):
        load_backbone(bert)
    with pytest.raises(UserError, match="num_classes"):
        build_lt_model(bert, num_classes=0)


def test_checkpoint_missing_weights_raises(tmp_path, vit_dir):
    broken = tmp_path / "broken"
    shutil.copytree(vit_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["layernorm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 backbone weights"):
        load_backbone(broken)


# ---- heads ------------------------------------------------------------------------------------------------


def test_random_head_init_seeded_unit_rows():
    a, b, c = random_head_init(5, 8, 0), random_head_init(5, 8, 0), random_head_init(5, 8, 1)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    assert fingerprint(a) != fingerprint(a.reshape(8, 5))  # shape is part of the hash


def test_cosine_and_linear_heads():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    head = CosineHead(2, 2, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    torch.testing.assert_close(head(x), torch.tensor([[6.0, -8.0], [10.0, 0.0]]))
    assert [n for n, _ in head.named_parameters()] == ["weight"]
    linear = LinearHead(2, 2)
    assert torch.equal(linear.bias, torch.zeros(2))
    torch.testing.assert_close(linear(x), x @ linear.weight.T)


def test_l2_normed_and_layer_normed_heads():
    x = torch.tensor([[3.0, 4.0, 5.0], [1.0, 0.0, -1.0]])
    w = torch.tensor([[2.0, 0.0, 0.0], [0.0, -3.0, 4.0]])
    l2, ln = L2NormedHead(2, 3), LayerNormedHead(2, 3)
    for head in (l2, ln):
        with torch.no_grad():
            head.weight.copy_(w)
        assert [n for n, _ in head.named_parameters()] == ["weight"]  # no scale, bias or LayerNorm affine
    # rows w/|w| = [1, 0, 0] and [0, -0.6, 0.8]; features raw
    torch.testing.assert_close(l2(x), torch.tensor([[3.0, -2.4 + 4.0], [1.0, -0.8]]))
    # LayerNorm of [3, 4, 5] and [1, 0, -1]: (x - mean) / sqrt(var + 1e-12), biased var 2/3: [-a, 0, a], a = 1.2247
    a = (1.5) ** 0.5
    torch.testing.assert_close(ln(x), torch.tensor([[-a, 0.8 * a], [a, -0.8 * a]]))
    torch.testing.assert_close(ln(x * 7 + 3), ln(x))  # invariant to feature scale and shift, unlike l2_normed


def test_build_lt_model_head_types(clip_dir):
    assert {"cosine", "linear", "l2_normed", "layer_normed"} <= set(HEADS.names())
    assert isinstance(build_lt_model(clip_dir, 4, head_type="layer_normed").head, LayerNormedHead)
    assert isinstance(build_lt_model(clip_dir, 4, head_type="linear").head, LinearHead)
    model = build_lt_model(clip_dir, 4, head_scale=30.0, seed=5)
    assert model.head.scale == 30.0 and model.num_classes == 4
    assert fingerprint(model.head.weight) == fingerprint(random_head_init(4, 32, 5))
    with pytest.raises(UserError, match="unknown head type"):
        build_lt_model(clip_dir, 4, head_type="mlp")


def _hand_text_init(clip_dir, class_names, templates):
    """Through CLIPModel.forward's own text_embeds (normalised projected text features) as the reference."""
    from transformers import AutoTokenizer

    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    rows = []
    with torch.no_grad():
        for name in class_names:
            ids = tok([t.format(name) for t in templates], padding=True, return_tensors="pt")
            embeds = clip(pixel_values=random_pixels(1), **ids).text_embeds
            rows.append(F.normalize(embeds.mean(0), dim=-1))
        return F.normalize(torch.stack(rows) @ clip.visual_projection.weight, dim=-1)


def test_text_head_init_matches_hand_computation(clip_dir):
    weight = text_head_init(clip_dir, CLASSES, prompts="single", device="cpu")
    expected = _hand_text_init(clip_dir, ["cat", "maple tree", "aquarium fish"], ["a photo of a {}."])
    assert weight.shape == (3, 32)
    torch.testing.assert_close(weight, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.norm(dim=-1), torch.ones(3))


def test_text_head_init_template_list_matches_hand_computation(clip_dir):
    templates = ["a photo of a {}.", "itap of the {}.", "a toy {}."]
    weight = text_head_init(clip_dir, CLASSES, prompts=templates, batch_size=4, device="cpu")
    expected = _hand_text_init(clip_dir, ["cat", "maple tree", "aquarium fish"], templates)
    torch.testing.assert_close(weight, expected, atol=1e-5, rtol=1e-5)


def test_text_head_init_deterministic_ensemble_differs(tmp_path, clip_dir):
    single = text_head_init(clip_dir, CLASSES, device="cpu")
    rebuilt = make_tiny_clip(tmp_path / "again")  # same call, separately written checkpoint
    assert fingerprint(text_head_init(rebuilt, CLASSES, device="cpu")) == fingerprint(single)
    ensemble = text_head_init(clip_dir, CLASSES, prompts="ensemble", device="cpu")
    assert len(IMAGENET_TEMPLATES) == 80
    torch.testing.assert_close(ensemble.norm(dim=-1), torch.ones(3))
    assert (ensemble - single).abs().max() > 1e-3
    underscored = text_head_init(clip_dir, ["maple_tree"], device="cpu")
    torch.testing.assert_close(underscored, single[1:2])


def test_classname_and_descriptor_prompts_match_hand_computation(tmp_path, clip_dir):
    weight = text_head_init(clip_dir, CLASSES, prompts="classname", device="cpu")
    torch.testing.assert_close(weight, _hand_text_init(clip_dir, ["cat", "maple tree", "aquarium fish"], ["{}"]),
                               atol=1e-5, rtol=1e-5)
    # descriptor: each class's own descriptions (any number), averaged; keys by raw or cleaned class name
    descriptions = {"cat": ["a small furry pet", "whiskers"], "maple tree": ["a tree with lobed leaves"],
                    "aquarium fish": ["a colourful fish", "fins", "a tank"]}
    path = tmp_path / "descriptors.json"
    path.write_text(json.dumps(descriptions))
    weight = text_head_init(clip_dir, CLASSES, prompts="descriptor", device="cpu", descriptor_file=path)
    expected = torch.cat([_hand_text_init(clip_dir, [n], descriptions[n]) for n in descriptions])
    torch.testing.assert_close(weight, expected, atol=1e-5, rtol=1e-5)
    path.write_text(json.dumps({"cat": ["whiskers"]}))
    with pytest.raises(UserError, match=r"no descriptions for classes \['maple_tree', 'aquarium fish'\]"):
        text_head_init(clip_dir, CLASSES, prompts="descriptor", device="cpu", descriptor_file=path)
    for bad in ('{"cat": []}', '["cat"]', '{"cat": "whiskers"}'):
        path.write_text(bad)
        with pytest.raises(UserError, match="must map each class name to a non-empty list"):
            text_head_init(clip_dir, CLASSES, prompts="descriptor", device="cpu", descriptor_file=path)
    path.write_text("{oops")
    with pytest.raises(UserError, match="is not valid JSON"):
        text_head_init(clip_dir, CLASSES, prompts="descriptor", device="cpu", descriptor_file=path)
    with pytest.raises(UserError, match="needs --prompt_descriptor_file"):
        text_head_init(clip_dir, CLASSES, prompts="descriptor", device="cpu")


def test_text_head_init_rejects_non_clip(tmp_path, clip_dir, vit_dir):
    with pytest.raises(UserError, match="class_mean"):
        text_head_init(vit_dir, CLASSES)
    CLIPVisionModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "vision")
    with pytest.raises(UserError, match="class_mean"):
        text_head_init(tmp_path / "vision", CLASSES)
    with pytest.raises(UserError, match="prompt mode"):
        text_head_init(clip_dir, CLASSES, prompts="fancy")


def _loader(pixels, labels, batch_size=3):
    return [
        {"pixel_values": pixels[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, len(labels), batch_size)
    ]


def test_class_mean_head_init(vit_dir):
    model = build_lt_model(vit_dir, num_classes=3).train()
    pixels, labels = random_pixels(7), torch.tensor([0, 2, 0, 1, 2, 2, 0])
    weight = class_mean_head_init(model, _loader(pixels, labels), num_classes=3)
    assert model.training  # mode restored
    with torch.no_grad():
        feats = model.eval().features(pixels)
    expected = torch.stack([F.normalize(feats[labels == c].mean(0), dim=-1) for c in range(3)])
    torch.testing.assert_close(weight, expected)
    with pytest.raises(UserError, match=r"classes \[1\] have no training images"):
        class_mean_head_init(model, _loader(pixels[:3], labels[:3]), num_classes=3)
    with pytest.raises(UserError, match="label 2 outside"):
        class_mean_head_init(model, _loader(pixels, labels), num_classes=2)


def test_set_head_weight(clip_dir):
    model = build_lt_model(clip_dir, 3, head_type="linear")
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    weight = torch.arange(96, dtype=torch.float32).reshape(3, 32)
    set_head_weight(model, weight)
    assert torch.equal(model.head.weight, weight) and torch.equal(model.head.bias, torch.zeros(3))
    with pytest.raises(UserError, match="disagree"):
        set_head_weight(model, torch.zeros(4, 32))
