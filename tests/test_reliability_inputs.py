"""Hostile input to the five command lines (train_lt.py, eval_lt.py, soup.py, predict.py, data_scripts/build_lt.py):
bad flag values, bad preset values, outputs overlapping inputs, corrupted exports, checkpoints and files.

Each case asserts: exit status 2, exactly one `error:` line naming the flag or file and the fix (after a `;`), no
traceback, and every existing file byte-identical afterwards (the whole workspace hashed before and after). The
commands run in-process through their `main(argv)`; `test_real_processes_*` runs a few as real processes.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from helpers_data import write_image_folder
from helpers_faults import cli_mains, one_error_line, tree_digest
from helpers_train import QUIET_ENV, REPO, tiny_train_args, write_synthetic_idx

MAINS = cli_mains()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    idx = write_synthetic_idx(root / "idx")
    run = root / "run"
    MAINS["train"](tiny_train_args(idx, run, "--max_train_steps", "2", "--checkpointing_steps", "1", "--eval_steps", "1"))
    assert (run / "final").is_dir() and (run / "best").is_dir() and (run / "step_2").is_dir()
    images = write_image_folder(root / "images", [6, 5, 4])
    (root / "file.txt").write_text("not a folder")
    return {"root": root, "idx": idx, "run": run, "images": images, "file": root / "file.txt",
            "cache": tmp_path_factory.mktemp("cache")}


def refused(world, cli, argv, expect, capsys, extra_roots=()):
    """Run `cli` on argv; assert the one-line refusal containing `expect`, and no file changed anywhere."""
    roots = [world["root"], *extra_roots]
    before = tree_digest(*roots)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        MAINS[cli](list(map(str, argv)))
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert exit_info.value.code == 2
    assert expect in line and "; " in line, line
    assert tree_digest(*roots) == before, "a refused command changed existing files"
    return line


# ------------------------------------------------------------------------------------------- train: flags
TRAIN_FLAGS = [
    ("imb", "nan", "not finite"), ("imb", "inf", "not finite"), ("imb", "0.5", "out of range"), ("imb", "x", "not a number"),
    ("max_per_class", "0", "out of range"), ("max_per_class", "-3", "out of range"), ("max_per_class", "2.5", "not an integer"),
    ("imb_seed", "-1", "out of range"), ("imb_seed", str(2**32), "out of range"), ("selection", "lifts", "not a valid choice"),
    ("val_per_class", "-1", "out of range"), ("val_source", "test", "not a valid choice"),
    ("many_threshold", "-1", "out of range"), ("few_threshold", "-5", "out of range"),
    ("per_device_eval_batch_size", "0", "out of range"), ("num_workers", "-1", "out of range"),
    ("max_eval_samples", "0", "out of range"), ("tte", "five", "not a valid choice"),
    ("relabel_by_name", "maybe", "not a boolean"), ("from_scratch", "2", "not a boolean"),
    ("method", "loraa", "not a valid choice"), ("adapter_dim", "0", "out of range"), ("adapter_dim", "-2", "out of range"),
    ("lora_alpha", "0", "out of range"), ("lora_alpha", "nan", "not finite"), ("lora_dropout", "1", "out of range"),
    ("lora_dropout", "-0.1", "out of range"), ("head_type", "cos", "not a valid choice"), ("head_scale", "0", "out of range"),
    ("head_scale", "-25", "out of range"), ("head_scale", "inf", "not finite"), ("head_init", "txt", "not a valid choice"),
    ("prompt_template", "many", "not a valid choice"), ("augment", "rotate", "not a valid choice"),
    ("loss", "focall", "not a valid choice"), ("tau", "-1", "out of range"), ("tau", "nan", "not finite"),
    ("label_smoothing", "1.0", "out of range"), ("label_smoothing", "-0.1", "out of range"),
    ("sampler", "class_balance", "not a valid choice"), ("balance_factor", "0.5", "out of range"),
    ("balance_factor", "inf", "not finite"), ("subset_seed", "-1", "out of range"), ("optimizer", "lion", "not a valid choice"),
    ("learning_rate", "0", "out of range"), ("learning_rate", "-0.01", "out of range"), ("learning_rate", "nan", "not finite"),
    ("weight_decay", "-1", "out of range"), ("weight_decay", "nan", "not finite"), ("momentum", "1", "out of range"),
    ("momentum", "-0.1", "out of range"), ("momentum", "1.5", "out of range"), ("lr_scheduler_type", "exponential", "not a valid choice"),
    ("num_warmup_steps", "-5", "out of range"), ("min_lr_ratio", "1.5", "out of range"), ("min_lr_ratio", "-0.1", "out of range"),
    ("num_train_epochs", "0", "out of range"), ("num_train_epochs", "-1", "out of range"), ("max_train_steps", "0", "out of range"),
    ("max_train_steps", "-3", "out of range"), ("max_train_steps", "2.0", "not an integer"), ("min_train_steps", "-1", "out of range"),
    ("per_device_train_batch_size", "0", "out of range"), ("per_device_train_batch_size", "-8", "out of range"),
    ("gradient_accumulation_steps", "0", "out of range"), ("total_batch_size", "0", "out of range"),
    ("max_grad_norm", "-1", "out of range"), ("max_grad_norm", "nan", "not finite"), ("ema_decay", "nan", "not finite"),
    ("ema_decay", "1.0", "out of range"), ("ema_decay", "1.5", "out of range"), ("ema_decay", "-0.5", "out of range"),
    ("mixed_precision", "fp8", "not a valid choice"), ("eval_steps", "0", "positive number of steps"),
    ("eval_steps", "-2", "positive number of steps"), ("eval_steps", "often", "positive number of steps"),
    ("checkpointing_steps", "0", "positive number of steps"), ("checkpointing_steps", "1.5", "positive number of steps"),
    ("select_metric", "mean_acc", "not a valid choice"), ("seed", "-1", "out of range"), ("seed", "4294967296", "out of range"),
    ("report_to", "bogus", "not a valid choice"), ("output_dir", "", "empty path"),
    ("dataset_config_name", "quick", "not a valid choice"), ("torch_compile_mode", "fast", "not a valid choice"),
    ("torch_compile_backend", "turbo", "not a valid choice"), ("max_train_samples", "0", "out of range"),
    ("max_train_samples", "2.5", "not an integer"), ("trust_remote_code", "maybe", "not a boolean"),
    ("focal_gamma", "-1", "out of range"), ("focal_gamma", "nan", "not finite"), ("ldam_max_margin", "0", "out of range"),
    ("cb_beta", "1", "out of range"), ("cb_beta", "0", "out of range"), ("cb_beta", "inf", "not finite"),
    ("grw_exponent", "-0.5", "out of range"), ("lade_lambda", "-1", "out of range"), ("lade_weight", "nan", "not finite"),
    ("tte_views", "0", "out of range"), ("tte_views", "1.5", "not an integer"), ("tte_expand", "-1", "out of range"),
    ("interpolation", "lanczos", "not a valid choice"), ("groups_from_imb", "0.5", "out of range"),
    ("groups_from_imb", "inf", "not finite"), ("prompt_template", "descriptors", "not a valid choice"),
    ("prompt_descriptor_file", "", "empty path"),
]


@pytest.mark.parametrize("flag, value, problem", TRAIN_FLAGS, ids=[f"{f}={v}" for f, v, _ in TRAIN_FLAGS])
def test_train_flag_values(world, tmp_path, capsys, flag, value, problem):
    argv = tiny_train_args(world["idx"], world["run"], f"--{flag}", value)  # the existing run as output: must survive
    line = refused(world, "train", argv, f"--{flag} ", capsys)
    assert problem in line


def test_train_cross_flag_thresholds(world, capsys):
    refused(world, "train", tiny_train_args(world["idx"], world["run"], "--few_threshold", "300"),
            "--few_threshold 300 is above --many_threshold", capsys)


# ------------------------------------------------------------------------------------------ train: presets
PRESETS = [
    ("sampler: class_balance", "--sampler class_balance"), ("lr_scheduler_type: exponential", "--lr_scheduler_type exponential"),
    ("optimizer: lion", "--optimizer lion"), ("augment: rotate", "--augment rotate"), ("augment: [flip]", "list"),
    ("learning_rate: null", "is not allowed"), ("max_train_steps: 3.5", "not an integer"),
    ("max_train_steps: 3.0", "not an integer"), ("ema_decay: .nan", "not finite"), ("max_grad_norm: -1", "out of range"),
    ("imb: .inf", "not finite"), ("from_scratch: perhaps", "not a boolean"), ("method: {a: 1}", "mapping"),
    ("num_train_epochs: ten", "not an integer"), ("seed: -4", "out of range"), ("learning_rat: 0.1", "unknown keys"),
    ("eval_steps: 0", "positive number of steps"), ("report_to: bogus", "not a valid choice"), ("tau: -1", "out of range"),
    ("label_smoothing: 1", "out of range"), ("head_scale: 0", "out of range"), ("num_workers: -1", "out of range"),
    ("overwrite_output_dir: maybe", "not a boolean"), ("- a\n- b", "must be a mapping"), ("a: [b", "not valid yaml"),
    ("per_device_train_batch_size: true", "not an integer"), ("weight_decay: '1e-4x'", "not a number"),
    ("gradient_checkpointing: maybe", "not a boolean"), ("torch_compile_mode: fast", "--torch_compile_mode fast"),
    ("dataset_config_name: [quickstart]", "list"), ("max_train_samples: 0", "out of range"),
    ("dataset_name: [a, b]", "list"), ("trust_remote_code: perhaps", "not a boolean"),
]


@pytest.mark.parametrize("text, expect", PRESETS, ids=[t.split(":")[0].split("\n")[0] for t, _ in PRESETS])
def test_train_preset_values_get_the_command_line_checks(world, tmp_path, capsys, text, expect):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text + "\n")
    refused(world, "train", tiny_train_args(world["idx"], world["run"], "--config", preset), expect, capsys)


def test_train_preset_false_string_is_false(world, tmp_path, capsys):
    """`overwrite_output_dir: "false"` once counted as true and deleted a run."""
    preset = tmp_path / "preset.yaml"
    preset.write_text('overwrite_output_dir: "false"\n')
    refused(world, "train", tiny_train_args(world["idx"], world["run"], "--config", preset), "already holds a run", capsys)


def test_train_preset_not_utf8_or_missing(world, tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_bytes(b"learning_rate: 0.1 # \xff\xfe\n")
    refused(world, "train", tiny_train_args(world["idx"], world["run"], "--config", preset), "not UTF-8", capsys)
    refused(world, "train", tiny_train_args(world["idx"], world["run"], "--config", tmp_path / "nope.yaml"), "not found",
            capsys)


# -------------------------------------------------------------------------------------------- train: paths
def _train_paths(w):
    final = w["run"] / "final"
    return {
        "output_is_data_dir": (["--output_dir", w["idx"]], "is the input --data_dir"),
        "output_inside_data_dir": (["--output_dir", w["idx"] / "out"], "lies inside the input --data_dir"),
        "output_contains_data_dir": (["--output_dir", w["root"]], "contains the input --data_dir"),
        "output_is_init_from": (["--output_dir", final, "--method", "head", "--init_from", final], "is the input --init_from"),
        "output_is_a_file": (["--output_dir", w["file"]], "is a file"),
        "output_under_a_file": (["--output_dir", w["file"] / "run"], "is a file"),
        "cache_dir_is_a_file": (["--output_dir", w["root"] / "new_run", "--cache_dir", w["file"]], "--cache_dir"),
        "output_not_utf8": (["--output_dir", os.fsdecode(b"/tmp/run\xff")], "not UTF-8"),
        "used_output_dir": ([], "already holds a run"),
        "resume_without_checkpoint": (["--output_dir", w["root"] / "fresh", "--resume_from_checkpoint", "latest"],
                                      "no complete step_* checkpoint"),
        "resume_not_a_checkpoint": (["--output_dir", w["root"] / "fresh2", "--resume_from_checkpoint", w["idx"]],
                                    "not a resume checkpoint"),
        "finished_run_other_settings": (["--resume_from_checkpoint", "latest", "--learning_rate", "0.5"],
                                        "a finished run"),
    }


TRAIN_PATH_CASES = list(_train_paths({"root": REPO, "idx": REPO, "run": REPO, "file": REPO}))


@pytest.mark.parametrize("case", TRAIN_PATH_CASES)
def test_train_paths(world, capsys, case):
    flags, expect = _train_paths(world)[case]
    refused(world, "train", tiny_train_args(world["idx"], world["run"]) + list(map(str, flags)), expect, capsys)


@pytest.mark.parametrize("flags, expect", [
    (["--head_init", "text"], "--head_init text needs a pretrained image-text checkpoint (CLIP, SigLIP)"),
    (["--model_name_or_path", "/nonexistent/model"], "/nonexistent/model"),
    (["--method", "head", "--init_from", "/nonexistent/export"], "/nonexistent/export not found"),
    (["--augment_on_device", "--augment", "crop_flip"], "--augment_on_device resizes RandomResizedCrop views"),
    (["--augment_on_device", "--method", "head"], "--augment_on_device does not apply to --method head with cached"),
], ids=["head_init_text_vit", "missing_model", "missing_init_from", "augment_on_device_crop_flip",
        "augment_on_device_cached_head"])
def test_overwrite_output_dir_validates_before_deleting(world, capsys, flags, expect):
    """--overwrite_output_dir once removed the earlier run before a flag error found seconds later."""
    refused(world, "train", tiny_train_args(world["idx"], world["run"], "--overwrite_output_dir", *flags), expect, capsys)


# ------------------------------------------------------------------------------------ corrupted artefacts
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan(path, value=math.nan):
    tensors = load_file(str(path))
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(**changes):
    def edit(path):
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
    return edit


CORRUPTIONS = {
    "weights_truncated": ("model.safetensors", _truncate, "not a readable safetensors file"),
    "weights_garbage": ("model.safetensors", lambda p: p.write_bytes(os.urandom(300)), "not a readable safetensors file"),
    "weights_empty": ("model.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    "weights_nan": ("model.safetensors", _nan, "non-finite"),
    "weights_inf": ("model.safetensors", lambda p: _nan(p, math.inf), "non-finite"),
    "head_init_nan": ("head_init.safetensors", _nan, "non-finite"),
    "head_init_missing": ("head_init.safetensors", lambda p: p.unlink(), "head_init.safetensors not found"),
    "weights_missing": ("model.safetensors", lambda p: p.unlink(), "missing model.safetensors"),
    "config_garbage": ("config.json", lambda p: p.write_bytes(b"{\x00garbage"), "corrupted"),
    "config_empty": ("config.json", lambda p: p.write_text(""), "corrupted"),
    "config_list": ("config.json", lambda p: p.write_text("[1, 2]"), "not an lt-hf export"),
    "config_other_model": ("config.json", _edit_config(model_type="vit"), "not an lt-hf export"),
    "config_old_format": ("config.json", _edit_config(lt_format="v0"), "format"),
    "config_lacks_record": ("config.json", _edit_config(lt_info=None), "lt_info is missing"),
    "config_method_not_a_config": ("config.json", _edit_config(method="full_all"), "method is missing or not a dict"),
    "head_scale_zero": ("config.json", _edit_config(head_scale=0), "head_scale is 0"),
    "head_scale_nan": ("config.json", lambda p: p.write_text(p.read_text().replace('"head_scale": 25.0',
                                                                                '"head_scale": NaN')), "head_scale is nan"),
    "labels_cut": ("config.json", _edit_config(id2label={"0": "a"}), "1 labels for 10 per-class train counts"),
    "old_layout": ("lt_model.json", lambda p: p.write_text('{"format": "lt-export-v2"}'), "convert_export.py"),
}


def corrupted_export(world, tmp_path, case):
    export = tmp_path / "bad" / "final"
    shutil.copytree(world["run"] / "final", export)
    name, corrupt, expect = CORRUPTIONS[case]
    corrupt(export / name)
    return export, expect


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_eval_refuses_corrupted_exports(world, tmp_path, capsys, case):
    export, expect = corrupted_export(world, tmp_path, case)
    refused(world, "eval", [export, "--cache_dir", world["cache"]], expect, capsys, [tmp_path])


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_soup_refuses_corrupted_ingredients(world, tmp_path, capsys, case):
    export, expect = corrupted_export(world, tmp_path, case)
    refused(world, "soup", [world["run"] / "best", export, "--output_dir", tmp_path / "soup"], expect, capsys, [tmp_path])
    assert not (tmp_path / "soup").exists()


# predict.py needs no head init; a config renamed to another model type still names this model's code (auto_map), so
# transformers loads it correctly
@pytest.mark.parametrize("case", [c for c in CORRUPTIONS if not c.startswith("head_") and c != "config_other_model"])
def test_predict_refuses_corrupted_exports(world, tmp_path, capsys, case):
    """predict.py loads with transformers alone, after the same checks of the record and the weight files."""
    export, expect = corrupted_export(world, tmp_path, case)
    refused(world, "predict", [export, world["images"], "--output", tmp_path / "p.csv"], expect, capsys, [tmp_path])
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("case", ["weights_nan", "weights_truncated", "config_garbage", "head_init_missing",
                                  "head_scale_nan", "old_layout"])
def test_init_from_refuses_corrupted_exports(world, tmp_path, capsys, case):
    export, expect = corrupted_export(world, tmp_path, case)
    argv = tiny_train_args(world["idx"], tmp_path / "stage2", "--method", "head", "--init_from", export)
    refused(world, "train", argv, expect, capsys, [tmp_path])


CHECKPOINT_CORRUPTIONS = {
    "weights_truncated": ("model.safetensors", _truncate, "cannot be loaded"),
    "weights_garbage": ("model.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "cannot be loaded"),
    "weights_nan": ("model.safetensors", _nan, "non-finite"),
    "optimizer_truncated": ("optimizer.bin", _truncate, "cannot be loaded"),
    "identity_garbage": ("lt_resume.json", lambda p: p.write_text("{nope"), "corrupted"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CORRUPTIONS)
def test_resume_refuses_corrupted_checkpoints(world, tmp_path, capsys, case):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(world["run"] / "step_2", out / "step_2")
    name, corrupt, expect = CHECKPOINT_CORRUPTIONS[case]
    corrupt(out / "step_2" / name)
    # the run's own flags (another --max_train_steps would be refused before the checkpoint is read)
    argv = tiny_train_args(world["idx"], out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    refused(world, "train", argv, expect, capsys, [tmp_path])
    assert sorted(p.name for p in out.iterdir()) == ["step_2"]


# ------------------------------------------------------------------------------------------------ eval
EVAL_FLAGS = [("imb", "nan"), ("split", "dev"), ("tte", "five"), ("per_device_eval_batch_size", "0"), ("num_workers", "-1"),
              ("max_eval_samples", "0"), ("many_threshold", "-1"), ("mixed_precision", "fp8"), ("prompt_template", "x"),
              ("imb_seed", "-1"), ("val_per_class", "-1"), ("max_per_class", "0"), ("which", "last"),
              ("torch_compile_mode", "fast"), ("dataset_config_name", "quick"), ("top_k", "0")]


@pytest.mark.parametrize("flag, value", EVAL_FLAGS, ids=[f"{f}={v}" for f, v in EVAL_FLAGS])
def test_eval_flag_values(world, capsys, flag, value):
    refused(world, "eval", [world["run"] / "final", f"--{flag}", value], f"--{flag} ", capsys)


def test_eval_cross_flag_thresholds(world, capsys):
    refused(world, "eval", [world["run"] / "final", "--few_threshold", "500"], "--few_threshold 500", capsys)


@pytest.mark.parametrize("out, extra, expect", [
    ("RUN/final", ["--overwrite"], "is the input RUN"), ("RUN", ["--overwrite"], "contains the input RUN"),
    ("RUN/final/x", [], "lies inside the input RUN"), ("FILE", [], "is a file"), ("IDX", ["--data_dir", "IDX"], "--data_dir"),
], ids=["is_export", "contains_export", "inside_export", "file", "is_data_dir"])
def test_eval_outputs_apart_from_inputs(world, capsys, out, extra, expect):
    sub = lambda s: str(s.replace("RUN", str(world["run"])).replace("FILE", str(world["file"]))  # noqa: E731
                        .replace("IDX", str(world["idx"])))
    refused(world, "eval", [world["run"] / "final", "--output_dir", sub(out), *map(sub, extra)], expect, capsys)


def test_eval_missing_inputs(world, capsys):
    refused(world, "eval", [world["root"] / "nope"], "not found", capsys)
    refused(world, "eval", [], "nothing to evaluate", capsys)


# ------------------------------------------------------------------------------------------------ soup
SOUP_FLAGS = [(["--weights", "inf", "1", "--normalize"], "--weights inf"), (["--weights", "nan", "1"], "--weights nan"),
              (["--weights", "a", "1"], "--weights a"), (["--lam", "0"], "--lam 0"), (["--lam", "1.5"], "--lam 1.5"),
              (["--lambda", "nan"], "not finite"), (["--alpha", "1.5"], "--alpha 1.5"), (["--alpha", "-0.1"], "--alpha -0.1"),
              (["--alpha", "nan"], "--alpha nan"), (["--mode", "blend"], "--mode blend"),
              (["--mode", "greedy", "--select_metric", "x"], "--select_metric x"), (["--weights", "0.5"], "--weights"),
              (["--weights", "0.3", "0.3"], "sum to 0.6"), (["--which", "last"], "--which last")]


@pytest.mark.parametrize("flags, expect", SOUP_FLAGS, ids=[" ".join(f) for f, _ in SOUP_FLAGS])
def test_soup_flag_values(world, tmp_path, capsys, flags, expect):
    argv = [world["run"] / "best", world["run"] / "final", "--output_dir", tmp_path / "soup", *flags]
    refused(world, "soup", argv, expect, capsys, [tmp_path])


@pytest.mark.parametrize("out, expect", [
    ("RUN/final", "is the input ingredient 2"), ("RUN", "contains the input ingredient"),
    ("RUN/final/soup", "lies inside the input ingredient 2"), ("FILE", "is a file"),
], ids=["is_ingredient", "contains_ingredient", "inside_ingredient", "file"])
def test_soup_outputs_apart_from_inputs(world, capsys, out, expect):
    out = out.replace("RUN", str(world["run"])).replace("FILE", str(world["file"]))
    refused(world, "soup", [world["run"] / "best", world["run"] / "final", "--output_dir", out, "--overwrite"], expect, capsys)


def test_soup_existing_output_and_missing_ingredient(world, tmp_path, capsys):
    (tmp_path / "soup").mkdir()
    refused(world, "soup", [world["run"] / "best", world["run"] / "final", "--output_dir", tmp_path / "soup"],
            "already exists", capsys, [tmp_path])
    refused(world, "soup", [world["run"] / "best", tmp_path / "nope", "--output_dir", tmp_path / "s2"], "not found", capsys,
            [tmp_path])


# ---------------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("flags, expect", [
    (["--top_k", "0"], "--top_k 0"), (["--batch_size", "-1"], "--batch_size -1"), (["--top_k", "x"], "--top_k x"),
    ([], "--output is required"), (["--output", "OUT/preds.txt"], "must be a .csv"),
    (["--output", "RUN/final/preds.csv"], "lies inside the input the model"),
    (["--output", "IMAGES/preds.csv"], "lies inside the input image 1"),
], ids=["top_k", "batch_size", "top_k_text", "no_output", "not_csv", "inside_model", "inside_images"])
def test_predict_flags_and_outputs(world, tmp_path, capsys, flags, expect):
    sub = lambda s: s.replace("RUN", str(world["run"])).replace("IMAGES", str(world["images"])).replace(  # noqa: E731
        "OUT", str(tmp_path))
    refused(world, "predict", [world["run"] / "final", world["images"], *map(sub, flags)], expect, capsys, [tmp_path])


def test_predict_existing_output_and_missing_image(world, tmp_path, capsys):
    (tmp_path / "preds.csv").write_text("earlier")
    refused(world, "predict", [world["run"] / "final", world["images"], "--output", tmp_path / "preds.csv"],
            "already exists", capsys, [tmp_path])
    refused(world, "predict", [world["run"] / "final", tmp_path / "nope.png", "--output", tmp_path / "p.csv"],
            "does not exist", capsys, [tmp_path])


# -------------------------------------------------------------------------------------------- build_lt
BUILD_FLAGS = [("imb", "nan"), ("imb", "inf"), ("imb", "0.5"), ("max_per_class", "0"), ("seed", "-1"),
               ("val_per_class", "-1"), ("test_per_class", "0"), ("test_per_class", "-1"), ("many_threshold", "-1"),
               ("selection", "x"), ("val_source", "x"), ("relabel_by_name", "maybe"), ("dataset_config_name", "quick"),
               ("max_train_samples", "0"), ("max_train_samples", "-5"), ("trust_remote_code", "maybe")]


@pytest.mark.parametrize("flag, value", BUILD_FLAGS, ids=[f"{f}={v}" for f, v in BUILD_FLAGS])
def test_build_flag_values(world, tmp_path, capsys, flag, value):
    argv = ["--dataset", "imagefolder_lt", "--data_dir", world["images"], "--output_dir", tmp_path / "ds", f"--{flag}", value]
    refused(world, "build", argv, f"--{flag} ", capsys, [tmp_path])


@pytest.mark.parametrize("out, extra, expect", [
    ("IMGS", ["--overwrite"], "is the input --data_dir"), ("IMGS/ds", [], "lies inside the input --data_dir"),
    ("ROOT", ["--overwrite"], "contains the input --data_dir"), ("FILE", ["--overwrite"], "is a file"),
    ("RUN", [], "already exists"), ("ROOT/ds", ["--few_threshold", "300"], "--few_threshold 300"),
    ("ROOT/ds", ["--cache_dir", "FILE"], "--cache_dir"), ("NOT_UTF8", [], "not UTF-8"),
], ids=["is_data", "inside_data", "contains_data", "file", "exists", "thresholds", "cache_file", "not_utf8"])
def test_build_outputs_apart_from_inputs(world, capsys, out, extra, expect):
    sub = lambda s: (os.fsdecode(b"/tmp/ds\xff") if s == "NOT_UTF8" else  # noqa: E731
                     s.replace("IMGS", str(world["images"])).replace("ROOT", str(world["root"]))
                     .replace("FILE", str(world["file"])).replace("RUN", str(world["run"])))
    argv = ["--dataset", "imagefolder_lt", "--data_dir", world["images"], "--test_per_class", "1", "--val_per_class", "1",
            "--imb", "2", "--output_dir", sub(out), *map(sub, extra)]
    refused(world, "build", argv, expect, capsys)


@pytest.mark.parametrize("per_class, expect", [([5], "at least 2"), ([1, 1, 1], "held out per class for test")],
                         ids=["one_class", "one_image_per_class"])
def test_build_refuses_unusable_datasets(world, tmp_path, capsys, per_class, expect):
    images = write_image_folder(tmp_path / "imgs", per_class)
    argv = ["--dataset", "imagefolder_lt", "--data_dir", images, "--test_per_class", "1", "--output_dir", tmp_path / "ds",
            "--cache_dir", world["cache"]]
    refused(world, "build", argv, expect, capsys, [tmp_path])
    assert not (tmp_path / "ds").exists()


def test_build_without_val_images_saves_a_loadable_dataset(world, tmp_path):
    """An empty split cannot be loaded by `datasets`: it is left out and rebuilt empty on load."""
    from lt_utils.data import load_lt_dataset

    MAINS["build"](["--dataset", "imagefolder_lt", "--data_dir", str(world["images"]), "--test_per_class", "1",
                    "--val_per_class", "0", "--imb", "2", "--output_dir", str(tmp_path / "ds"),
                    "--cache_dir", str(world["cache"])])
    ds, info = load_lt_dataset(str(tmp_path / "ds"))
    assert ds["validation"].num_rows == 0 and ds["train"].num_rows == sum(info.train_counts) and ds["test"].num_rows == 3


# ------------------------------------------------------------------- a `datasets` source (--dataset_name, hf_lt)
@pytest.fixture(scope="module")
def hf_src(world):
    """A parquet source with columns img / fine_label / note, and an imagefolder whose labels are class-name strings."""
    from helpers_hf import write_imagefolder, write_parquet

    root = world["root"] / "hf"
    return {"pq": write_parquet(root / "pq"), "imf": write_imagefolder(root / "imf"), "root": root}


HF_CASES = {  # flags after --dataset_name SRC --image_column_name img --label_column_name fine_label: expected text
    "image_column": (["--image_column_name", "picture"], "--image_column_name picture: split train of SRC has no column "
                     "'picture'; its columns are img, fine_label, note"),
    "label_column": (["--label_column_name", "fine"], "its columns are img, fine_label, note"),
    "label_not_classlabel": (["--label_column_name", "note"], "holds string, not a ClassLabel, so it names no classes; "
                             "pass --class_names_file"),
    "image_not_image": (["--image_column_name", "note"], "holds string, not images"),
    "test_split": (["--test_split", "dev"], "--test_split dev: SRC has no split 'dev'; its splits are test, train"),
    "train_split": (["--train_split", "training"], "its splits are test, train"),
    "validation_split": (["--validation_split", "valid"], "--validation_split valid"),
    "two_roles": (["--validation_split", "test"], "serves two roles"),
    "two_sources": (["--dataset", "cifar100"], "--dataset cifar100 and --dataset_name"),
    "data_dir": (["--data_dir", "ROOT"], "--data_dir is not used with --dataset_name"),
    "short_names_file": (["--class_names_file", "TWO"], "is outside 0..1"),
    "missing_folder": (["--dataset_name", "ROOT/nope"], "could not load --dataset_name"),
    "config_of_a_folder": (["--dataset_name", "ARROW", "--dataset_config_name", "full"], "has no configs"),
}


def _hf_argv(world, hf_src, flags):
    two = hf_src["root"] / "two.txt"
    if not two.exists():
        two.write_text("apple\nbear\n")
    arrow = hf_src["root"] / "arrow"
    if not arrow.exists():
        from helpers_hf import write_arrow

        write_arrow(arrow)
    sub = {"ROOT": str(world["root"]), "TWO": str(two), "ARROW": str(arrow)}
    flags = [next((v + f[len(k):] for k, v in sub.items() if f.startswith(k)), f) for f in flags]
    return ["--dataset_name", str(hf_src["pq"]), "--image_column_name", "img", "--label_column_name", "fine_label",
            *flags]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_build_refuses_bad_datasets_sources(world, hf_src, tmp_path, capsys, case):
    flags, expect = HF_CASES[case]
    argv = [*_hf_argv(world, hf_src, flags), "--output_dir", tmp_path / "ds", "--cache_dir", world["cache"]]
    refused(world, "build", argv, expect.replace("SRC", str(hf_src["pq"])), capsys, [tmp_path])
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("flag, value", [("max_train_samples", "10"), ("test_split", "test"), ("label_column_name", "y"),
                                         ("trust_remote_code", "true")])
def test_datasets_source_flags_without_a_dataset_name(world, tmp_path, capsys, flag, value):
    argv = ["--dataset", "imagefolder_lt", "--data_dir", world["images"], "--output_dir", tmp_path / "ds",
            "--cache_dir", world["cache"], f"--{flag}", value]
    refused(world, "build", argv, f"--{flag} applies to a --dataset_name source, not to --dataset imagefolder_lt", capsys,
            [tmp_path])


def test_build_output_apart_from_the_datasets_source(world, hf_src, capsys):
    argv = [*_hf_argv(world, hf_src, []), "--cache_dir", world["cache"], "--output_dir", hf_src["pq"] / "data" / "lt"]
    refused(world, "build", argv, "lies inside the input --dataset_name", capsys)
    refused(world, "build", [*argv[:-1], hf_src["pq"], "--overwrite"], "is the input --dataset_name", capsys)


def test_hf_string_labels_outside_the_class_names_file(world, hf_src, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("apple\nbear\ncat\n")  # no dog
    argv = ["--dataset_name", hf_src["imf"], "--label_column_name", "fine_label", "--class_names_file", names,
            "--output_dir", tmp_path / "ds", "--cache_dir", world["cache"]]
    refused(world, "build", argv, "label 'dog' is not in --class_names_file", capsys, [tmp_path])
    argv = ["--dataset_name", hf_src["imf"], "--label_column_name", "fine_label", "--output_dir", tmp_path / "ds",
            "--cache_dir", world["cache"]]
    refused(world, "build", argv, "string, not a ClassLabel", capsys, [tmp_path])


@pytest.mark.parametrize("case", ["image_column", "test_split", "label_not_classlabel", "two_sources"])
def test_train_and_eval_refuse_bad_datasets_sources(world, hf_src, capsys, case):
    flags, expect = HF_CASES[case]
    expect = expect.replace("SRC", str(hf_src["pq"]))
    # [4:]: without tiny_train_args' --dataset fashion_mnist_lt --data_dir IDX; --overwrite_output_dir: the existing
    # run must survive a refusal that comes after the output checks
    argv = tiny_train_args(world["idx"], world["run"], "--overwrite_output_dir", *_hf_argv(world, hf_src, flags))[4:]
    refused(world, "train", argv, expect, capsys)
    refused(world, "eval", [world["run"] / "final", *_hf_argv(world, hf_src, flags)], expect, capsys)


# ---------------------------------------------------------------------------------------- real processes
@pytest.mark.slow  # four real processes
def test_real_processes_exit_2_with_one_line(world, tmp_path):
    """The same contract from the shell, one command per entry script (every case of each runs in-process above):
    exit status 2, one `error:` line, no traceback, nothing changed."""
    run, final = world["run"], world["run"] / "final"
    commands = {
        "train_overwrite": ["train_lt.py", *tiny_train_args(world["idx"], run, "--overwrite_output_dir", "--head_init", "text")],
        "eval": ["eval_lt.py", str(final), "--output_dir", str(final), "--overwrite"],
        "soup": ["soup.py", str(run / "best"), str(final), "--output_dir", str(run), "--overwrite"],
        # a Hub id with the Hub unreachable (offline): the real datasets.load_dataset call, refused in one line
        "build_hub_id": ["data_scripts/build_lt.py", "--dataset_name", "someone/not-on-this-machine", "--output_dir",
                         str(world["root"] / "hub_ds")],
    }
    before = tree_digest(world["root"])
    env = {**os.environ, **QUIET_ENV}
    procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, cmd in commands.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        one_error_line(err)
        assert proc.returncode == 2, (name, err[-500:])
    assert tree_digest(world["root"]) == before


# ------------------------------------------------------------------------------------------- the flag table
def test_every_flag_of_the_five_clis_comes_from_the_table():
    """A flag added with a bare add_argument would skip the checks (and presets could not set it)."""
    import eval_lt
    import predict
    import soup
    from helpers_faults import load_build_lt

    from lt_utils.config import FLAGS, build_train_parser

    parsers = {"train": build_train_parser(), "eval": eval_lt.get_args_parser(), "soup": soup.get_args_parser(),
               "build": load_build_lt().get_args_parser(), "predict": predict.get_args_parser()}
    for cli, parser in parsers.items():
        options = {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
        assert len(options) >= 4 and options == set(parser._lt_flags), (cli, options ^ set(parser._lt_flags))
    assert {"save_predictions", "top_k"} <= set(parsers["eval"]._lt_flags)
    assert set(parsers["predict"]._lt_flags) == {"output", "top_k", "batch_size", "overwrite"}
    new = {"which", "dataset_config_name", "torch_compile", "torch_compile_backend", "torch_compile_mode",
           "gradient_checkpointing", "save_predictions", "top_k", "output", "batch_size"}
    assert new <= set(FLAGS)
    assert FLAGS["which"].choice_list() == ["best", "final"]
    # --dataset_config_name is also a `datasets` config of --dataset_name, so its names are checked with the dataset
    # (check_cross_flags), not by a fixed choice list
    from lt_utils.data.loading import builder_config_names

    assert FLAGS["dataset_config_name"].choice_list() is None and "quickstart" in builder_config_names()
    new_hf = {"dataset_name", "dataset_revision", "train_split", "validation_split", "test_split", "image_column_name",
              "label_column_name", "max_train_samples", "trust_remote_code"}
    assert new_hf <= set(parsers["train"]._lt_flags) & set(parsers["eval"]._lt_flags) & set(parsers["build"]._lt_flags)
    assert "aot_eager" in FLAGS["torch_compile_backend"].choice_list()


def test_secret_flags_are_never_shown_or_recorded(world, capsys):
    from lt_utils.config import SECRET_FLAGS, public_flags

    assert SECRET_FLAGS == {"hub_token"}
    assert public_flags({"hub_token": "hf_SECRET", "seed": 3}) == {"hub_token": None, "seed": 3}
    line = refused(world, "train", tiny_train_args(world["idx"], world["run"], "--hub_token", "hf_SECRET\udcff"),
                   "--hub_token <hidden> contains bytes that are not UTF-8", capsys)
    assert "SECRET" not in line


# --------------------------------------------------------------------------------------- image bit depths
def test_16_bit_and_float_images_are_scaled_not_clipped():
    """convert("RGB") clips 16-bit grayscale to white: every class identical. Scaled, the pixels keep their order."""
    import io

    import numpy as np
    from PIL import Image

    import torch

    from lt_utils.transforms import ToRGB

    ramp16 = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    buf = io.BytesIO()
    Image.fromarray(ramp16).save(buf, format="PNG")
    png16 = Image.open(io.BytesIO(buf.getvalue()))
    assert png16.mode.startswith("I")
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for image in (png16, ramp16, Image.fromarray(ramp16.astype(np.float32) / 65535, mode="F"),
                  ramp16.astype(np.float64) / 65535):
        rgb = ToRGB()(image)
        assert rgb.dtype == torch.uint8 and tuple(rgb.shape) == (3, 16, 16), type(image)
        assert all(np.array_equal(rgb[c].numpy(), expected) for c in range(3)), type(image)


@pytest.mark.parametrize("side", [16, 80])  # decoded once into the uint8 array / decoded when read (> 64x64 px)
def test_16_bit_images_are_scaled_in_the_uint8_data_path(side):
    """The DataLoader's path: a `datasets` split of 16-bit PNGs through ImageSplit and the eval transform."""
    import datasets
    import numpy as np
    from PIL import Image

    from lt_utils.data.images import ImageSplit
    from lt_utils.transforms import ToRGB, build_eval_transform

    ramps = [(np.linspace(0, 65535, side * side).reshape(side, side) * k / 3).astype(np.uint16) for k in (1, 2, 3)]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(r) for r in ramps], "label": [0, 1, 2]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    assert ds[0]["image"].mode.startswith("I")
    split = ImageSplit(ds, transform=lambda image: image)
    assert (split.array is not None) == (side <= 64)
    for index, ramp in enumerate(ramps):
        pixels = ToRGB()(split[index]["pixel_values"])
        expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
        assert all(np.array_equal(pixels[c].numpy(), expected) for c in range(3)), index
    # normalised for the model, the three images differ (clipped, all three were white)
    transform = build_eval_transform(16, [0.5] * 3, [0.5] * 3)
    means = [float(transform(split[i]["pixel_values"]).mean()) for i in range(3)]
    assert means[0] < means[1] < means[2] < 1.0, means


def test_eval_reads_the_data_dir_the_export_was_trained_on(world, tmp_path):
    """Once only a warning: an export trained with --data_dir X was evaluated on Debian's Fashion-MNIST."""
    assert json.loads((world["run"] / "final" / "config.json").read_text())["run"]["data_dir"] == \
        str(world["idx"].resolve())
    results = MAINS["eval"]([str(world["run"] / "final"), "--output_dir", str(tmp_path / "ev"),
                             "--cache_dir", str(world["cache"])])
    (metrics,) = results.values()
    assert metrics["num_samples"] == 100  # the synthetic test split (Debian's has 10,000 images)
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]["num_samples"] == 100
