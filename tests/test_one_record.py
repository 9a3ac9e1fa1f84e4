"""One record per export, through the real CLIs: the weights are stored once, and an export needs nothing but its
own folder (the base checkpoint it was trained from can move away)."""
import json
import shutil

import torch
from safetensors import safe_open

from helpers_faults import cli_mains
from helpers_train import TINY_VIT, export_tensors, tiny_train_args
from lt_utils.checkpoint import load_export

MAINS = cli_mains()


def _tensor_bytes(state):
    return sum(v.numel() * v.element_size() for v in state.values())


def _stored_bytes(export):
    """Bytes of tensor data in every safetensors file of the export (headers left out)."""
    total = 0
    for path in export.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return total


def test_weights_once_and_nothing_but_the_export_folder_is_read(idx_dir, tmp_path, capsys):
    base = shutil.copytree(TINY_VIT, tmp_path / "base")  # a "pretrained" checkpoint with weights of its own
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTModel(ViTConfig.from_pretrained(TINY_VIT), add_pooling_layer=False).save_pretrained(base)
    for name, method in (("lora", "lora"), ("bitfit", "bitfit")):
        argv = tiny_train_args(idx_dir, tmp_path / name, "--max_train_steps", "4", "--eval_steps", "2")
        for flag, value in (("--model_name_or_path", base), ("--from_scratch", "false"), ("--method", method)):
            argv[argv.index(flag) + 1] = str(value)
        MAINS["train"](argv)
    out = tmp_path / "lora"
    for export in (out / "final", tmp_path / "bitfit" / "final"):
        state = load_export(export)[0].state_dict()
        # weights once: every safetensors file together (model, head init, a LoRA run's plain adapter) within 5%
        assert _stored_bytes(export) <= 1.05 * _tensor_bytes(state), export
        assert set(export_tensors(export)) == set(state)
    recorded = json.loads((out / "final" / "metrics.json").read_text())["test"]
    _adapter_alone_is_what_peft_loads(out / "final", base, tmp_path)

    shutil.move(str(base), str(tmp_path / "moved_away"))  # the base checkpoint is gone
    capsys.readouterr()
    results = MAINS["eval"]([str(out / "final"), "--output_dir", str(tmp_path / "ev"), "--num_workers", "0",
                             "--cache_dir", str(tmp_path / "hf_cache")])
    assert list(results.values())[0]["per_class_acc"] == recorded["per_class_acc"]
    manifest = MAINS["soup"]([str(out / "best"), str(out / "final"), "--output_dir", str(tmp_path / "soup")])
    assert manifest["weights"] == [0.5, 0.5]
    rows = MAINS["predict"]([str(tmp_path / "soup"), str(_png(tmp_path)), "--output", str(tmp_path / "p.csv")])
    assert len(rows) == 1 and (tmp_path / "p.csv").is_file()
    stage2 = tmp_path / "stage2"
    argv = tiny_train_args(idx_dir, stage2, "--method", "head", "--init_from", str(tmp_path / "soup"),
                           "--max_train_steps", "2", "--eval_steps", "none")
    MAINS["train"](argv)
    first, second = load_export(tmp_path / "soup")[0].state_dict(), load_export(stage2 / "final")[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first if not k.startswith("head."))  # only the head trained
    assert not torch.equal(first["head.weight"], second["head.weight"])


def _png(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (28, 28), (120, 30, 200)).save(path)
    return path


def _adapter_alone_is_what_peft_loads(export, base, tmp_path):
    """--hub_push adapter uploads the plain peft adapter alone: PeftModel.from_pretrained takes that very folder."""
    import huggingface_hub
    from peft import PeftModel
    from transformers import AutoModel

    from lt_utils.hub import push_export

    hub = tmp_path / "hub"
    calls = {}
    saved = huggingface_hub.upload_folder
    huggingface_hub.upload_folder = lambda repo_id, folder_path, **kw: calls.update(
        repo=repo_id, copy=shutil.copytree(folder_path, hub / repo_id, ignore=shutil.ignore_patterns(*kw["ignore_patterns"])))
    try:
        assert push_export(export, "you/tiny-lora", what="adapter") == "https://huggingface.co/you/tiny-lora"
    finally:
        huggingface_hub.upload_folder = saved
    repo = hub / "you" / "tiny-lora"
    assert sorted(p.name for p in repo.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "head.safetensors"]
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(repo)).merge_and_unload()
    merged = load_export(export)[0].state_dict()
    got = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    assert all(torch.equal(got[k], merged[k]) for k in got if k in merged) and len(set(got) & set(merged)) > 10


def test_adapter_push_is_refused_before_training(idx_dir, tmp_path, capsys):
    import pytest

    for method, message in (("full_all", "this method has none"), ("lora", "would name its base by the local folder")):
        argv = tiny_train_args(idx_dir, tmp_path / method, "--push_to_hub", "--hub_push", "adapter")
        argv[argv.index("--method") + 1] = method
        with pytest.raises(SystemExit) as exit_info:
            MAINS["train"](argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err
        assert not (tmp_path / method).exists()


def test_predict_refuses_a_classifier_whose_files_lack_weights(tmp_path, capsys):
    """transformers fills missing weights with a random init and only warns; predict.py refuses such a model."""
    import pytest
    from safetensors.torch import load_file, save_file
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path / "vit_cls"
    ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                        image_size=28, patch_size=7, num_labels=3)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    assert len(MAINS["predict"]([str(folder), str(_png(tmp_path)), "--output", str(tmp_path / "ok.csv")])) == 1
    weights = load_file(str(folder / "model.safetensors"))
    del weights["classifier.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exit_info:
        MAINS["predict"]([str(folder), str(_png(tmp_path)), "--output", str(tmp_path / "p.csv")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "lack 1 of the model's weights (e.g. classifier.weight)" in line
    assert not (tmp_path / "p.csv").exists()
