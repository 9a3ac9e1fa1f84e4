"""Exports work with the real clients alone: transformers (auto classes, pipeline) and peft, in an interpreter where
lt_utils cannot be imported; the same logits as eval_lt.py's loading path; preprocessing pixel for pixel; the card."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lt_utils import data_loaders as D
from lt_utils.checkpoint import load_export
from lt_utils.heads import random_head_init
from lt_utils.hub import adapter_snippet, model_card, model_snippet
from lt_utils.models import BackboneSpec
from lt_utils.methods import method_config
from lt_utils.peft_methods import apply_method
from lt_utils.spec import DataSpec
from lt_utils.soup import make_soup
from tests.helpers_models import make_tiny_clip
from tests.helpers_soup import (DEBIAN_FMNIST, _read_idx, perturbed, tiny_info, tiny_lt_model, write_ingredient,
                                write_lora_ingredient)
from tests.helpers_cli import run_cli
from tests.helpers_train import run_without_project

REPO = Path(__file__).resolve().parents[1]
FMNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
C = len(FMNIST)
README_MODEL, README_ADAPTER, README_BASE = "you/lift-c100-lt", "you/lift-c100-lt-lora", "openai/clip-vit-base-patch16"
METRICS = {"validation": {"accuracy": 50.0, "mean_class_acc": 40.0, "many_acc": None, "medium_acc": 45.0, "few_acc": 35.0},
           "test": {"accuracy": 61.25, "mean_class_acc": 55.5, "many_acc": None, "medium_acc": 60.0, "few_acc": 51.0}}


def fmnist_info():
    return dataclasses.replace(tiny_info(C), class_names=list(FMNIST))


def trained_keys(model):
    """What `model` (an LTModel after apply_method) trains: the tensors an export of that run moves."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def write_pngs(root, n=6):
    """The first `n` Fashion-MNIST test images as PNG files (real images, grayscale 28x28)."""
    root.mkdir(parents=True)
    images = _read_idx(DEBIAN_FMNIST / "t10k-images-idx3-ubyte.gz")[:n]
    paths = [root / f"img{i}.png" for i in range(n)]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny CLIP base (card: license mit), PNGs, and one export per method plus a soup."""
    root = tmp_path_factory.mktemp("hub")
    base = make_tiny_clip(root / "tiny-clip")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny clip\n")
    info = fmnist_info()
    lt = tiny_lt_model(base, C)
    state = {k: v.clone() for k, v in lt.state_dict().items()}
    head_init = random_head_init(C, lt.spec.hidden_size, seed=7)
    exports = {
        "full": write_ingredient(root / "full", lt, base, perturbed(state, state, seed=1), head_init, info=info),
        "full2": write_ingredient(root / "full2", lt, base, perturbed(state, state, seed=2), head_init, info=info),
        "bitfit": write_ingredient(root / "bitfit", lt, base,
                                   perturbed(state, trained_keys(apply_method(tiny_lt_model(base, C), "bitfit")), seed=3),
                                   head_init, method="bitfit", info=info),
        "head": write_ingredient(root / "head", lt, base, perturbed(state, ["head.weight"], seed=4), head_init,
                                 method="head", info=info),
        "lora": write_lora_ingredient(root / "lora", base, head_init, seed=5, num_labels=C, r=2, info=info),
    }
    # LIFT's module methods: their modules re-created by the remote code from the recorded method config and block
    # wiring
    for seed, (method, margs) in enumerate((("adaptformer", {"r": 2}), ("vpt_deep", {"vpt_len": 3, "partial_layers": 1}),
                                            ("vpt_shallow", {"vpt_len": 2}), ("adapter", {"r": 2}),
                                            ("mask", {"mask_ratio": 0.05, "mask_seed": 3}),
                                            ("ssf_attn", {}), ("ssf_ln", {"partial_layers": 1})), start=9):
        model = tiny_lt_model(base, C)
        config = method_config(method, C, model.spec.num_layers, **margs)
        model = apply_method(model, config)
        exports[method] = write_ingredient(root / method, model, base,
                                           perturbed(model.state_dict(), trained_keys(model), seed=seed, scale=0.5),
                                           head_init, method=config, info=info)
    make_soup([exports["full"], exports["full2"]], root / "soup", progress=False)
    exports["soup"] = root / "soup"
    del exports["full2"]
    return {"root": root, "base": base, "exports": exports, "images": write_pngs(root / "images")}


def eval_lt_logits(export_dir, paths):
    """Logits as eval_lt.py computes them: load_export, the export's test transform (no TTE), forward."""
    model, meta = load_export(export_dir)
    transform = D.test_transform(BackboneSpec.from_dict(meta["backbone"]), DataSpec())
    with torch.no_grad():
        return model(torch.stack([transform(Image.open(p)) for p in paths])).float()


def assert_same_logits_on_same_pixels(export_dir, logits, pixels_file):
    """On the very pixels the transformers client fed its model, eval's model (load_export) gives its logits: both load
    the one model.safetensors into the one model code (1e-6 leaves room for another thread count's summation order
    in the client process, not for another model)."""
    model, _ = load_export(export_dir)
    with torch.no_grad():
        ours = model(torch.load(pixels_file))
    torch.testing.assert_close(logits, ours, rtol=0, atol=1e-6, msg=str(export_dir))


CLIENT = r'''
import logging, warnings
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

images = [Image.open(p) for p in cfg["images"]]
out = {"sys_path_has_repo": any(Path(p).resolve() == Path(cfg["repo"]) for p in sys.path if p)}
for name, export in cfg["exports"].items():
    model = AutoModelForImageClassification.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(export)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    torch.save(pixels, Path(cfg["out"]).parent / f"{name}.pixels.pt")  # for the same-pixels comparison
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    classifier = pipeline("image-classification", model=export, trust_remote_code=True)
    preds = classifier(images, top_k=3)
    out[name] = {"logits": logits.tolist(), "class": type(model).__name__, "module": type(model).__module__,
                 "processor": type(processor).__name__, "pipeline": preds}

# the LoRA run's standard peft adapter of the plain base model, then its saved head
records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage()) if record.levelno >= logging.WARNING else None
for logger_name in ("transformers", "peft"):
    logging.getLogger(logger_name).addHandler(handler)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from peft import PeftModel
    base = AutoModel.from_pretrained(cfg["base"])
    peft_model = PeftModel.from_pretrained(base, cfg["exports"]["lora"], subfolder="adapter")
# transformers' own deprecation notices (not about the adapter) aside
out["peft_warnings"] = [str(w.message) for w in caught if w.category is not FutureWarning] + records
out["peft_base_name"] = peft_model.peft_config["default"].base_model_name_or_path
from safetensors import safe_open
import torch.nn.functional as F
with safe_open(str(Path(cfg["exports"]["lora"]) / "adapter" / "head.safetensors"), "pt") as f:
    head, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
processor = AutoImageProcessor.from_pretrained(cfg["exports"]["lora"])
with torch.no_grad():
    feature = peft_model.eval().vision_model(**processor(images, return_tensors="pt")).pooler_output  # a CLIPModel
out["peft_logits"] = (float(meta["scale"]) * F.normalize(feature, dim=-1) @ F.normalize(head["weight"], dim=-1).T).tolist()

# the README's Hub snippets, ids replaced by local folders
for key in ("model_snippet", "adapter_snippet"):
    scope = {}
    exec(cfg[key], scope)
    out[key] = scope["logits"].tolist()
Path(cfg["out"]).write_text(json.dumps(out))
'''


def readme_block(marker):
    """The python block after `<!-- marker -->` in README.md."""
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n", text.index(f"<!-- {marker} -->")) + len("```python\n")
    return text[start:text.index("\n```", start)]


@pytest.mark.slow  # a fresh interpreter without this project
def test_exports_load_with_transformers_and_peft_alone(setup, tmp_path):
    exports, paths = setup["exports"], setup["images"]
    model_code = readme_block("hub-model-snippet")
    adapter_code = readme_block("hub-adapter-snippet")
    # the README shows exactly what every model card shows
    assert model_code == model_snippet(README_MODEL)
    assert adapter_code == adapter_snippet(README_ADAPTER, README_BASE, "cosine", "clip")
    local = {README_ADAPTER: str(exports["lora"]), README_MODEL: str(exports["adaptformer"]),  # longest id first
             README_BASE: str(setup["base"]), "image.png": str(paths[0])}
    for hub_id, path in local.items():
        model_code, adapter_code = model_code.replace(hub_id, path), adapter_code.replace(hub_id, path)
    cfg = {"images": [str(p) for p in paths], "exports": {k: str(v) for k, v in exports.items()},
           "base": str(setup["base"]), "repo": str(REPO), "model_snippet": model_code, "adapter_snippet": adapter_code}
    out = run_without_project(CLIENT, cfg, tmp_path)
    assert out["sys_path_has_repo"] is False
    for name, export in exports.items():
        ref = eval_lt_logits(export, paths)
        got = out[name]
        assert got["class"] == "LTForImageClassification" and got["module"].startswith("transformers_modules."), name
        assert got["processor"] == "CLIPImageProcessor"
        # the processor's pixels are eval's within float32 rounding (test_preprocessor_config_...): within 1e-5
        assert torch.allclose(torch.tensor(got["logits"]), ref, atol=1e-5, rtol=0), (name, got["logits"][0], ref[0])
        assert_same_logits_on_same_pixels(export, torch.tensor(got["logits"]), tmp_path / f"{name}.pixels.pt")
        probs = ref.softmax(-1)
        for row, pred in zip(range(len(paths)), got["pipeline"]):
            top = probs[row].topk(3)
            assert [p["label"] for p in pred] == [FMNIST[i] for i in top.indices.tolist()], name
            assert np.allclose([p["score"] for p in pred], top.values.tolist(), atol=1e-5), name
    # exports differ from each other and from the untrained base (a weight-blind load would not)
    assert not torch.allclose(eval_lt_logits(exports["full"], paths), eval_lt_logits(exports["soup"], paths), atol=1e-3)
    # peft: no warning, base recorded, the head on the adapted plain backbone gives the model's logits
    assert out["peft_warnings"] == [], out["peft_warnings"]
    assert out["peft_base_name"] == str(setup["base"])
    lora_ref = eval_lt_logits(exports["lora"], paths)
    assert torch.allclose(torch.tensor(out["peft_logits"]), lora_ref, atol=1e-5, rtol=0)
    # README snippets: the AdaptFormer export on image 0, the LoRA adapter on image 0
    assert torch.allclose(torch.tensor(out["model_snippet"]), eval_lt_logits(exports["adaptformer"], paths[:1]), atol=1e-5)
    assert torch.allclose(torch.tensor(out["adapter_snippet"]), lora_ref[:1], atol=1e-5)


def test_preprocessor_config_reproduces_the_eval_transform(setup):
    from transformers import AutoImageProcessor

    export = setup["exports"]["full"]
    processor = AutoImageProcessor.from_pretrained(export)
    _, meta = load_export(export)
    transform = D.test_transform(BackboneSpec.from_dict(meta["backbone"]), DataSpec())
    rng = np.random.default_rng(0)
    images = [Image.open(p) for p in setup["images"]]  # real 28x28 grayscale
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 37), (300, 225), (33, 64))]
    for image in images:
        ours = transform(image)
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 32, 32)
        # identical resized / cropped uint8 pixels; only the fused rescale-normalise rounds differently (float32 ulp)
        assert (ours - theirs).abs().max() < 1e-6
    cfg = json.loads((Path(export) / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"shortest_edge": 36} and cfg["crop_size"] == {"height": 32, "width": 32}
    assert cfg["do_center_crop"] and cfg["resample"] == 3


def test_model_card_metadata(setup):
    from huggingface_hub import ModelCard

    _, meta = load_export(setup["exports"]["lora"])
    card = ModelCard(model_card(meta, METRICS))
    data = card.data.to_dict()
    assert "base_model" not in data and "not a Hub id" in card.text  # a local base folder: omitted, with a note
    assert data["license"] == "mit" and data["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-classification"
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("test", "accuracy")] == 61.25 and results[("test", "mean_class_accuracy")] == 55.5
    assert results[("test", "medium_shot_accuracy")] == 60.0 and results[("test", "few_shot_accuracy")] == 51.0
    assert ("test", "many_shot_accuracy") not in results  # an empty group has no number
    assert {r.dataset_type for r in card.data.eval_results} == {"zalando-datasets/fashion_mnist"}
    assert adapter_snippet("your-name/your-model", meta["base_model"], "cosine", "clip") in card.text
    hub_meta = {**meta, "base_model": README_BASE}
    assert ModelCard(model_card(hub_meta, METRICS)).data.base_model == README_BASE


def test_predict_py_writes_one_row_per_image(setup, tmp_path):
    export, paths = setup["exports"]["bitfit"], setup["images"]
    out = tmp_path / "preds.csv"
    cmd = [str(export), str(paths[0].parent), "--output", str(out), "--top_k", "2", "--batch_size", "4"]
    proc = run_cli("predict.py", *cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(p) for p in sorted(paths)]
    probs = eval_lt_logits(export, sorted(paths)).softmax(-1)
    for row, p in zip(rows, probs):
        top = p.topk(2)
        assert row["label"] == FMNIST[int(top.indices[0])] and abs(float(row["score"]) - float(top.values[0])) < 1e-5
        assert row["top_k_labels"].split("|") == [FMNIST[i] for i in top.indices.tolist()]
    # an existing output is refused, byte-identical; a missing input is one line
    before = out.read_bytes()
    proc = run_cli("predict.py", *cmd)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "already exists" in proc.stderr
    assert out.read_bytes() == before
    proc = run_cli("predict.py", *cmd[:1], str(tmp_path / "nope.png"), *cmd[2:])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


# --------------------------------------------------------------------------------------------- CNN backbones
RESNET8 = REPO / "configs" / "models" / "cifar_resnet8"

CNN_CLIENT = r'''
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

images = [Image.open(p) for p in cfg["images"]]
out = {}
for name, export in cfg["exports"].items():
    model = AutoModelForImageClassification.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(export)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    torch.save(pixels, Path(cfg["out"]).parent / f"{name}.pixels.pt")  # for the same-pixels comparison
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    # every tensor the project exported (BatchNorm running statistics and batch counts included), as the remote
    # model holds it: the trained-like tensors written, in LTModel key names, no more and no fewer
    state = model.state_dict()
    written = load_file(cfg["written"][name])
    out[name] = {"logits": logits.tolist(), "class": type(model).__name__, "module": type(model).__module__,
                 "backbone": type(model.lt.backbone).__name__, "backbone_module": type(model.lt.backbone).__module__,
                 "missing": sorted(k for k in written if "lt." + k not in state),
                 "extra": sorted(k for k in state if k.removeprefix("lt.") not in written),
                 "differ": sorted(k for k in written if "lt." + k in state
                                  and not (state["lt." + k].dtype == written[k].dtype and torch.equal(state["lt." + k], written[k]))),
                 "pipeline": pipeline("image-classification", model=export, trust_remote_code=True)(images, top_k=1)}
Path(cfg["out"]).write_text(json.dumps(out))
'''


def trained_like(lt, seed):
    """Every tensor of `lt` moved away from its init, BatchNorm running statistics and batch counts included (a
    loader that skipped buffers would give other logits)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in lt.state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = value + 7
        elif key.endswith("running_var"):
            out[key] = value * (0.5 + torch.rand(value.shape, generator=g))
        else:
            out[key] = value + 0.1 * torch.randn(value.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def cnn_exports(tmp_path_factory):
    """A from-scratch CIFAR ResNet-8 export (the project's own PreTrainedModel) and a transformers ResNetModel one,
    linear heads, every weight and running statistic trained-like."""
    from transformers import ResNetConfig, ResNetModel

    from lt_utils.models import build_lt_model

    root = tmp_path_factory.mktemp("cnn")
    info = fmnist_info()
    (root / "written").mkdir()
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")).save_pretrained(
        root / "tiny-resnet")
    exports, written = {}, {}
    for name, base, seed, from_scratch in (("cifar_resnet", RESNET8, 1, True), ("resnet", root / "tiny-resnet", 2, False)):
        lt = build_lt_model(base, C, head_type="linear", from_scratch=from_scratch)
        tensors = trained_like(lt, seed)
        written[name] = root / "written" / f"{name}.safetensors"  # what the export must hold, in LTModel key names
        save_file(tensors, str(written[name]))
        exports[name] = write_ingredient(root / name, lt, base, tensors,
                                         random_head_init(C, lt.spec.hidden_size, seed=6 + seed), info=info,
                                         head_type="linear", from_scratch=from_scratch)
    return {"exports": exports, "written": written}


@pytest.mark.slow  # a fresh interpreter without this project
def test_cnn_exports_load_with_transformers_alone(cnn_exports, setup, tmp_path):
    """CIFAR ResNet (its code saved beside modeling_lt.py) and transformers' ResNet exports load through
    AutoModelForImageClassification(trust_remote_code=True) where lt_utils is not importable, with every exported
    tensor (BatchNorm buffers too), and give eval_lt.py's logits within 1e-5 (exactly on the same pixels)."""
    paths, written = setup["images"], cnn_exports["written"]
    cnn_exports = cnn_exports["exports"]
    assert (cnn_exports["cifar_resnet"] / "cifar_resnet.py").is_file()
    for name, export in cnn_exports.items():
        _, meta = load_export(export)
        assert meta["backbone"]["kind"] == name
    cfg = {"images": [str(p) for p in paths], "exports": {k: str(v) for k, v in cnn_exports.items()},
           "written": {k: str(v) for k, v in written.items()}}
    out = run_without_project(CNN_CLIENT, cfg, tmp_path)
    backbones = {"cifar_resnet": "CifarResNetModel", "resnet": "ResNetModel"}
    for name, export in cnn_exports.items():
        got, ref = out[name], eval_lt_logits(export, paths)
        assert got["class"] == "LTForImageClassification" and got["module"].startswith("transformers_modules."), name
        assert got["backbone"] == backbones[name]
        assert got["missing"] == got["extra"] == got["differ"] == [], (name, got["missing"][:3], got["extra"][:3],
                                                                       got["differ"][:3])
        assert torch.allclose(torch.tensor(got["logits"]), ref, atol=1e-5, rtol=0), (name, got["logits"][0], ref[0])
        assert_same_logits_on_same_pixels(export, torch.tensor(got["logits"]), tmp_path / f"{name}.pixels.pt")
        assert [p[0]["label"] for p in got["pipeline"]] == [FMNIST[i] for i in ref.argmax(-1).tolist()], name
    # the CIFAR ResNet ran the export's own copy of its code, not transformers' or this project's
    assert out["cifar_resnet"]["backbone_module"].startswith("transformers_modules.")
    # the running statistics matter: the same weights with fresh BatchNorm buffers give other logits
    model, _ = load_export(cnn_exports["cifar_resnet"])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    transform = D.test_transform(model.spec, DataSpec())
    with torch.no_grad():
        fresh = model(torch.stack([transform(Image.open(p)) for p in paths]))
    assert not torch.allclose(fresh, eval_lt_logits(cnn_exports["cifar_resnet"], paths), atol=1e-3)
    cfg = json.loads((cnn_exports["cifar_resnet"] / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"shortest_edge": 32} and cfg["crop_size"] == {"height": 32, "width": 32}  # CIFAR: no crop
