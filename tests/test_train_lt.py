"""train_lt.py end to end on CPU: exports, resume, bad input, NaN handling (tiny ViT, synthetic IDX data)."""
import json
import shutil
import sys
from unittest.mock import ANY

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_cli import run_cli
from helpers_train import REPO, assert_resumed_weights, export_config, export_tensors, run_main, tiny_train_args

sys.path.insert(0, str(REPO))
from lt_utils.checkpoint import load_export  # noqa: E402
from lt_utils.spec import DataSpec  # noqa: E402


def test_run_writes_exports_config_and_metrics(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = run_main(tiny_train_args(idx_dir, out, "--checkpointing_steps", "10", "--learning_rate", "0.003"))
    for name in ("final", "best"):
        export = out / name
        for f in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_lt.py",
                  "head_init.safetensors", "metrics.json", "README.md"):
            assert (export / f).is_file(), f"{name}/{f} missing"
        # one record: no second copy of the weights or of the metadata
        assert sorted(p.name for p in export.glob("*.safetensors")) == ["head_init.safetensors", "model.safetensors"]
        assert not list(export.glob("*.json.*")) and not (export / "lt_model.json").exists()
        config = export_config(export)
        assert config["model_type"] == "lt_classifier" and config["method"] == {"name": "full_all", "partial_layers": None}
        counts = config["lt_info"]["train_counts"]  # imb 10, n_max 40: 40 -> 4; the labels are stored once
        assert (len(counts), counts[0], counts[-1]) == (10, 40, 4) and "class_names" not in config["lt_info"]
        assert len(config["id2label"]) == 10
        metrics = json.loads((export / "metrics.json").read_text())
        assert metrics["test"]["num_samples"] == 100
        assert metrics["test"]["many_acc"] is None  # no class has > 100 training images here
        assert "| test |" in (export / "README.md").read_text()
    assert json.loads((out / "best" / "metrics.json").read_text())["validation"]["num_samples"] == 50
    # resume states hold only trainable tensors plus our counters; the config round-trips
    assert (out / "step_10" / "lt_resume.json").is_file() and (out / "step_20").is_dir()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["learning_rate"] == 0.003 and saved["method"] == "full_all"
    assert [json.loads(line)["step"] for line in (out / "log.txt").read_text().splitlines()] == [10, 20]
    assert results["final"]["test"]["accuracy"] > 30  # the synthetic classes are easy: well above 10% chance
    assert "| final (test) |" in capsys.readouterr().out


def test_export_reloads_to_the_recorded_numbers(idx_dir, tmp_path):
    out = tmp_path / "run"
    results = run_main(tiny_train_args(idx_dir, out, "--num_train_epochs", "1", "--eval_steps", "none"))
    assert not (out / "best").exists()  # no validation, no best
    model, meta = load_export(out / "final")
    assert meta["method"] == "full_all" and meta["num_labels"] == 10
    from accelerate import Accelerator
    from lt_utils import data_loaders as T
    from lt_utils.data import load_lt_dataset
    from lt_utils.engine import evaluate

    ds, info = load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, imb=10, max_per_class=40, val_per_class=5,
                               cache_dir=tmp_path / "hf_cache")
    loader = T.image_loader(ds["test"], T.test_transform(model.spec, DataSpec()), 64, 0)
    again = evaluate(model, loader, Accelerator(cpu=True), info.groups, 10)
    assert again["accuracy"] == pytest.approx(results["final"]["test"]["accuracy"], abs=1e-9)
    assert again["per_class_acc"] == results["final"]["test"]["per_class_acc"]


@pytest.mark.parametrize("extra", [[], ["--sampler", "class_balanced"],
                                   ["--ema_start", "first_step", "--warmup_start_factor", "1e-6", "--num_warmup_steps", "4"]],
                         ids=["random", "class_balanced", "lt_soups_ema_warmup"])
def test_resume_mid_epoch_ends_with_the_same_weights(idx_dir, tmp_path, extra):
    # 159 images / batch 16 = 10 batches = 5 optimizer steps per epoch with accumulation 2;
    # the resume at step 3 is mid-epoch, and the run crosses into the next epoch after it.
    # with an EMA, so its state must be restored too (the export holds the EMA weights)
    flags = ["--gradient_accumulation_steps", "2", "--max_train_steps", "8", "--checkpointing_steps", "3",
             "--eval_steps", "none", "--learning_rate", "0.003", "--ema_decay", "0.9", *extra]
    full = tmp_path / "full"
    run_main(tiny_train_args(idx_dir, full, *flags))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "step_3", resumed / "step_3")
    run_main(tiny_train_args(idx_dir, resumed, *flags, "--resume_from_checkpoint", "latest"))
    a, b = export_tensors(full / "final"), export_tensors(resumed / "final")
    assert_resumed_weights(b, a)
    start = load_file(full / "step_3" / "model.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in start if k in a)  # training did move after the checkpoint


def test_resume_refuses_other_method(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_main(tiny_train_args(idx_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--eval_steps", "none"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(tiny_train_args(idx_dir, out, "--method", "bitfit", "--max_train_steps", "4",
                                 "--resume_from_checkpoint", "latest"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume") and "--method full_all -> bitfit" in last


@pytest.mark.parametrize("flags, message", [
    (["--total_batch_size", "30", "--gradient_accumulation_steps", "4"], "not divisible"),
    (["--select_metric", "mean_acc"], "--select_metric mean_acc is not a valid choice"),
    (["--method", "head", "--augment", "rrc_flip"], "--augment rrc_flip does not apply to --method head"),
    (["--dataset", "mnist_lt"], "mnist_lt"),
    (["--model_name_or_path", "/nonexistent/model"], "/nonexistent/model"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU (autocast + GradScaler); on cpu"),
    (["--prompt_template", "descriptor"], "--prompt_template descriptor needs --prompt_descriptor_file"),
    (["--prompt_descriptor_file", "d.json"], "--prompt_descriptor_file needs --prompt_template descriptor"),
    (["--loss", "cb", "--label_smoothing", "0.1"], "--label_smoothing does not apply to --loss cb"),
    (["--head_init", "linear_probe", "--groups_from_imb", "0.5"], "--groups_from_imb 0.5 is out of range"),
])
def test_bad_input_is_one_line_and_exit_2(idx_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_main(tiny_train_args(idx_dir, out) + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ") and message in last
    assert not (out / "final").exists()


def test_overwrite_output_dir_leaves_nothing_of_the_earlier_run(idx_dir, tmp_path):
    out = tmp_path / "run"
    run_main(tiny_train_args(idx_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "2",
                             "--protocol", "best_test"))
    assert (out / "best").is_dir() and (out / "best_test").is_dir() and (out / "step_4").is_dir()
    first = json.loads((out / "all_results.json").read_text())
    assert (first["protocol"], first["paper_row"], first["best_test"]["selected_on"]) == ("best_test", "best_test", "test")
    # the best test score over the validations at steps 2 and 4, both of which best/ and final/ are
    scores = {name: first[name]["test"]["mean_class_acc"] for name in ("best", "final", "best_test")}
    assert scores["best_test"] == max(scores.values()), scores
    run_main(tiny_train_args(idx_dir, out, "--max_train_steps", "2", "--eval_steps", "none", "--method", "bitfit",
                             "--overwrite_output_dir"))
    assert not any((out / name).exists() for name in ("best", "best_test", "step_2", "step_4"))
    assert export_config(out / "final")["method"]["name"] == "bitfit"
    # no best/: the default protocol's paper row falls back to final/
    assert json.loads((out / "all_results.json").read_text()) == {
        "final": ANY, "protocol": "best_val", "paper_row": "final"}


def test_used_output_dir_is_not_overwritten(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_main(tiny_train_args(idx_dir, out, "--max_train_steps", "1", "--eval_steps", "none"))
    before = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        run_main(tiny_train_args(idx_dir, out, "--max_train_steps", "1"))
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").read_bytes() == before


def test_nan_loss_stops_and_names_the_last_good_checkpoint(idx_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train_lt.py", *tiny_train_args(
        idx_dir, out, "--head_type", "linear", "--loss", "ce", "--optimizer", "sgd", "--learning_rate", "1e12",
        "--momentum", "0", "--checkpointing_steps", "1", "--eval_steps", "none", "--max_train_steps", "20"))
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: loss became nan at optimizer step") and "Traceback" not in result.stderr
    step = int(last_line.split("optimizer step ")[1].split(";")[0])
    assert f"last good checkpoint: {out / f'step_{step - 1}'}" in last_line
    assert (out / f"step_{step - 1}" / "lt_resume.json").is_file()
    assert not (out / f"step_{step}").exists() and not (out / "final").exists()


def test_steps_after_a_mid_epoch_validation_train_in_train_mode():
    """A validation inside the epoch (--eval_steps N) puts the model in eval mode; the epoch's next steps train again
    (dropout on, BatchNorm statistics updated)."""
    from accelerate import Accelerator

    from lt_utils.engine import TrainState, predict, train_one_epoch

    modes = []

    class Recorder(torch.nn.Linear):
        def forward(self, x):
            modes.append(self.training)
            return super().forward(x)

    model = Recorder(4, 3)
    data = [{"pixel_values": torch.randn(2, 4), "labels": torch.tensor([0, 1])} for _ in range(4)]
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    validations = []

    def on_step(step):
        if step == 2:  # a validation between steps 2 and 3
            validations.append(predict(model, [data[0]], accelerator))
        return False

    train_one_epoch(model, data, optimizer, torch.nn.functional.cross_entropy, accelerator, TrainState(),
                    lambda step: 0.1, on_step=on_step)
    assert len(validations) == 1 and modes == [True, True, False, True, True]
