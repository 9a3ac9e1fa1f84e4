"""Exports of earlier layouts (v2: lt_model.json + lt_weights.safetensors + model.safetensors; v3: config.json with
the method's settings in `arch`): refused by every loader in one line naming the converter, and converted by
scripts/convert_export.py to the same model."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers_faults import tree_digest
from helpers_train import REPO, python_script
from lt_utils.checkpoint import load_export
from lt_utils.errors import UserError
from lt_utils.exports import convert_old_export

OLD = REPO / "tests" / "fixtures" / "old_export_v2"  # written by the previous version (a tiny from-scratch ViT)
V3 = REPO / "tests" / "fixtures" / "export_v3"  # AdaptFormer r=2 on the last of 2 blocks, written by the v3 code


def test_converted_export_is_the_same_model_stored_once(tmp_path):
    old = shutil.copytree(OLD, tmp_path / "old")
    before = tree_digest(old)
    result = python_script("scripts/convert_export.py", old, tmp_path / "new")
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
    with pytest.raises(UserError, match=f"format lt-export-v3; this version reads lt-export-v4: convert it once with "
                                        f"python scripts/convert_export.py {V3} NEW_DIR"):
        load_export(V3)
    model, meta = load_export(convert_old_export(V3, tmp_path / "new"))
    expected = load_file(str(V3 / "expected_logits.safetensors"))  # the v3 code's own forward pass
    with torch.no_grad():
        assert torch.equal(model(expected["pixel_values"]), expected["logits"])
    # the modules' settings (v3: arch.adapter_dim, arch.partial_layers) are now the method's config
    assert meta["method_config"] == {"name": "adaptformer", "r": 2, "partial_layers": 1} and len(model.adapters) == 1
