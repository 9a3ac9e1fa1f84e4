"""Exports of earlier layouts (v2: lt_model.json + lt_weights.safetensors + model.safetensors; v3: config.json with
the method's settings in `arch`; v4: the validation split recorded as "val"): refused by every loader in one line
naming the converter, and converted by scripts/convert_export.py to the same model."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers_cli import run_cli
from helpers_faults import tree_digest
from helpers_train import REPO
from lt_utils.checkpoint import load_export
from lt_utils.errors import UserError
from lt_utils.exports import convert_old_export

OLD = REPO / "tests" / "fixtures" / "old_export_v2"  # written by the previous version (a tiny from-scratch ViT)
V3 = REPO / "tests" / "fixtures" / "export_v3"  # AdaptFormer r=2 on the last of 2 blocks, written by the v3 code
V4 = REPO / "tests" / "fixtures" / "export_v4"  # the same architecture's best/, written by the v4 code


def test_converted_export_is_the_same_model_stored_once(tmp_path):
    old = shutil.copytree(OLD, tmp_path / "old")
    before = tree_digest(old)
    result = run_cli("scripts/convert_export.py", old, tmp_path / "new")
    assert result.returncode == 0, result.stderr[-2000:]
    assert tree_digest(old) == before  # only read
    new = tmp_path / "new"
    assert not (new / "lt_model.json").exists() and not (new / "lt_weights.safetensors").exists()
    model, meta = load_export(new)
    expected = load_file(str(OLD / "expected_logits.safetensors"))  # the previous version's own forward pass
    with torch.no_grad():
        assert torch.equal(model(expected["pixel_values"]), expected["logits"])
    assert meta["method"] == "full_all" and meta["train_counts"][0] == 40 and meta["head"]["init"] == "random"
    assert (new / "metrics.json").read_bytes() and "lt-hf" in (new / "README.md").read_text()


def test_loaders_name_the_converter_and_conversion_refuses_overlaps(tmp_path, capsys):
    with pytest.raises(UserError, match="convert it once with python scripts/convert_export.py"):
        load_export(OLD)
    with pytest.raises(UserError, match="NEW_DIR .* is the input OLD_DIR|inside"):
        convert_old_export(OLD, OLD / "converted")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        convert_old_export(OLD, tmp_path / "taken")
    new = convert_old_export(OLD, tmp_path / "new")
    with pytest.raises(UserError, match="it is not an export of an earlier layout"):
        convert_old_export(new, tmp_path / "again")


def test_v3_export_is_refused_naming_the_converter_and_converts_to_the_same_model(tmp_path):
    with pytest.raises(UserError, match=f"format lt-export-v3; this version reads lt-export-v5: convert it once with "
                                        f"python scripts/convert_export.py {V3} NEW_DIR"):
        load_export(V3)
    model, meta = load_export(convert_old_export(V3, tmp_path / "new"))
    expected = load_file(str(V3 / "expected_logits.safetensors"))  # the v3 code's own forward pass
    with torch.no_grad():
        assert torch.equal(model(expected["pixel_values"]), expected["logits"])
    # the modules' settings (v3: arch.adapter_dim, arch.partial_layers) are now the method's config
    assert meta["method_config"] == {"name": "adaptformer", "r": 2, "partial_layers": 1} and len(model.adapters) == 1
    assert sorted(meta["lt_info"].index_hashes) == ["test", "train", "validation"]  # v3 named the split val too


def test_v4_export_is_refused_by_a_command_and_converts_to_the_same_model_naming_validation(tmp_path, idx_dir):
    refused = run_cli("eval_lt.py", V4, "--num_workers", "0", "--output_dir", tmp_path / "eval")
    assert refused.code == 2 and refused.err.strip().splitlines()[-1] == (
        f"error: {V4 / 'config.json'} has format lt-export-v4; this version reads lt-export-v5: convert it once with "
        f"python scripts/convert_export.py {V4} NEW_DIR and use NEW_DIR")
    assert "Traceback" not in refused.err and not (tmp_path / "eval").exists()
    converted = run_cli("scripts/convert_export.py", V4, tmp_path / "new")
    assert converted.code == 0, converted.err
    new = tmp_path / "new"
    model, meta = load_export(new)
    expected = load_file(str(V4 / "expected_logits.safetensors"))  # the v4 code's own forward pass
    with torch.no_grad():
        assert torch.equal(model(expected["pixel_values"]), expected["logits"])
    weights, old_weights = (load_file(str(d / "model.safetensors")) for d in (new, V4))
    assert weights.keys() == old_weights.keys() and all(torch.equal(weights[k], old_weights[k]) for k in weights)
    old, renamed = (json.loads((d / "config.json").read_text()) for d in (V4, new))
    assert renamed["lt_format"] == "lt-export-v5" and meta["method_config"] == old["method"]
    for key in ("index_hashes", "split_sizes"):
        was = old["lt_info"][key]
        assert renamed["lt_info"][key] == {"train": was["train"], "validation": was["val"], "test": was["test"]}
    old_metrics, metrics = (json.loads((d / "metrics.json").read_text()) for d in (V4, new))
    assert metrics == {"validation": old_metrics["val"], "step": old_metrics["step"], "test": old_metrics["test"],
                       "tte": old_metrics["tte"]}
    # its recorded split is this version's validation split of the same images (idx_dir holds the v4 run's images;
    # the split hashes differ only by the gzip headers' times): the v4 run's own validation numbers of these weights
    evaluated = run_cli("eval_lt.py", new, "--data_dir", idx_dir, "--split", "validation", "--num_workers", "0",
                        "--output_dir", tmp_path / "eval")
    assert evaluated.code == 0, evaluated.err
    measured, recorded = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"], old_metrics["val"]
    assert measured["per_class_acc"] == recorded["per_class_acc"] and measured["num_samples"] == 50
    assert measured["nll"] == pytest.approx(recorded["nll"], rel=1e-5)


def test_resuming_a_run_whose_exports_an_earlier_version_wrote_is_refused_before_training(tmp_path):
    """A run dir from before the split was renamed: its best/ is lt-export-v4, which the run's final test would
    refuse after the training; the resume is refused at once, the run dir left as it was."""
    from helpers_train import tiny_train_args

    run = tmp_path / "run"
    shutil.copytree(V4, run / "best")
    (run / "step_10").mkdir()
    before = tree_digest(run)
    result = run_cli("train_lt.py", *tiny_train_args(tmp_path / "no_data", run, "--resume_from_checkpoint", "latest"))
    assert result.code == 2 and result.err.strip().splitlines()[-1] == (
        f"error: cannot resume {run}: its best/ was written by an earlier version (lt-export-v4; this version writes "
        "lt-export-v5); start a new --output_dir (convert best/ with python scripts/convert_export.py to keep it)")
    assert tree_digest(run) == before
