"""eval_lt.py end to end on CPU: one tiny export trained by train_lt.py, re-evaluated exactly, on 1 and 2 processes,
with TTE, against a zero-shot CLIP computed by hand with transformers' CLIPModel, compared in one table; bad inputs."""
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers_cli import run_cli
from helpers_hub import ONLINE, reachable_hub
from helpers_models import make_tiny_clip, random_pixels
from helpers_train import REPO, reset_accelerate, run_script, tiny_train_args

sys.path.insert(0, str(REPO))
import eval_lt  # noqa: E402
import train_lt  # noqa: E402
from lt_utils.data.info import LTInfo  # noqa: E402
from lt_utils.eval_runs import (DEFAULT_OUTPUT_ROOT, Target, assign_output_dirs, data_args_for, passed_flags,  # noqa: E402
                                recorded_data_flags)

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def run_dir(idx_dir, tmp_path_factory):
    """A run with best/ (validated at step 2) and final/ (step 4); test numbers recorded by train_lt.py."""
    out = tmp_path_factory.mktemp("train") / "run"
    reset_accelerate()
    train_lt.main(tiny_train_args(idx_dir, out, "--max_train_steps", "4", "--eval_steps", "2", "--learning_rate", "0.003"))
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="module")
def flags(run_dir, idx_dir):
    return ["--data_dir", str(idx_dir), "--cache_dir", str(run_dir.parent / "hf_cache"), "--num_workers", "0"]


def run_eval(*argv):
    reset_accelerate()
    return eval_lt.main([str(a) for a in argv])


def read_metrics(out_dir):
    return json.loads((out_dir / "metrics.json").read_text())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reevaluation_gives_the_numbers_train_lt_recorded(run_dir, flags, capsys):
    # a run dir means its best/; batch 64 as in training, so even the float NLL sums run in the same order
    results = run_eval(run_dir, "--split", "test", "--per_device_eval_batch_size", "64", *flags)
    out = run_dir / "best" / "eval_test"
    saved = read_metrics(out)
    recorded = json.loads((run_dir / "best" / "metrics.json").read_text())["test"]
    assert saved["metrics"] == recorded  # every number, per-class accuracies included, exactly
    assert results[str(run_dir / "best")] == recorded
    # the dataset came from the export's record: no --imb / --max_per_class passed
    assert saved["config"]["dataset"]["imb"] == 10.0 and saved["config"]["dataset"]["max_per_class"] == 40
    assert saved["config"]["split"] == "test" and saved["config"]["tte"] == "none"
    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class_id,class_name,train_count,group,test_samples,accuracy"
    info = json.loads((run_dir / "best" / "config.json").read_text())["lt_info"]
    assert [int(r.split(",")[2]) for r in rows[1:]] == info["train_counts"]
    assert [r.split(",")[1] for r in rows[1:]] == FASHION_NAMES
    assert (out / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert f"| {run_dir / 'best'} | {recorded['accuracy']:.2f} | {recorded['mean_class_acc']:.2f} |" in table


@pytest.mark.slow  # torchrun, 2 processes
def test_two_processes_give_exactly_the_one_process_metrics(run_dir, flags, tmp_path):
    # 100 test images, batch 16 x 2 processes: the last batch is padded with duplicates that must not count
    common = [str(run_dir / "final"), "--per_device_eval_batch_size", "16", *flags]
    run_eval(*common, "--output_dir", tmp_path / "one")
    # torchrun, not accelerate launch: with a MULTI_CPU config the latter starts one process unless mpirun is set up
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "eval_lt.py"]
    result = run_script(launch + common + ["--output_dir", str(tmp_path / "two")], env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes" in result.stderr
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert two["metrics"]["num_samples"] == 100
    assert two == one


def test_five_crop_tte_is_recorded_and_changes_the_numbers(run_dir, flags):
    run_eval(run_dir / "final", "--tte", "fivecrop", *flags)
    saved = read_metrics(run_dir / "final" / "eval_test_fivecrop")  # the default output dir names the TTE
    center_crop = json.loads((run_dir / "final" / "metrics.json").read_text())["test"]
    assert saved["config"]["tte"] == "fivecrop"
    assert saved["metrics"]["num_samples"] == 100
    assert saved["metrics"]["nll"] != pytest.approx(center_crop["nll"], abs=1e-9)


def test_train_split_with_randaug_tte_is_seeded_and_recorded(run_dir, flags):
    # LIFT's test_train: the training images through the test view (here LIFT's randaug TTE, 3 views)
    common = [run_dir / "final", "--split", "train", "--tte", "randaug", "--tte_views", "3", "--interpolation",
              "bilinear", *flags]
    run_eval(*common)
    out = run_dir / "final" / "eval_train_randaug3"
    saved = read_metrics(out)
    info = json.loads((run_dir / "final" / "config.json").read_text())["lt_info"]
    assert saved["metrics"]["num_samples"] == sum(info["train_counts"]) == 159
    assert saved["metrics"]["per_class_samples"] == info["train_counts"]
    assert (saved["config"]["split"], saved["config"]["tte"], saved["config"]["tte_views"]) == ("train", "randaug", 3)
    assert saved["config"]["interpolation"] == "bilinear"
    run_eval(*common, "--overwrite")  # the random views are seeded: the same numbers again
    assert read_metrics(out)["metrics"] == saved["metrics"]
    run_eval(*common[:6], "1", *common[7:], "--overwrite")
    assert read_metrics(run_dir / "final" / "eval_train_randaug1")["metrics"]["nll"] != saved["metrics"]["nll"]


def test_groups_from_imb_reports_both_groupings(run_dir, flags, tmp_path):
    from lt_utils.data.counts import lt_counts

    # trained at rho 10 (counts 40 30 23 18 14 11 8 6 5 4); groups from the rho-100 counts 40 23 14 8 5 3 1 1 0 0
    run_eval(run_dir / "final", "--groups_from_imb", "100", "--many_threshold", "25", "--few_threshold", "10", *flags,
             "--output_dir", tmp_path / "ref")
    saved = read_metrics(tmp_path / "ref")
    assert lt_counts(40, 100, 10) == [40, 23, 14, 8, 5, 3, 1, 1, 0, 0]
    m = saved["metrics"]
    assert (m["many_classes"], m["medium_classes"], m["few_classes"]) == (1, 2, 7)
    assert (m["split_groups"]["many_classes"], m["split_groups"]["medium_classes"], m["split_groups"]["few_classes"]) == (2, 4, 4)
    assert saved["config"]["dataset"]["groups_from_imb"] == 100.0
    groups = [row.split(",")[3] for row in (tmp_path / "ref" / "per_class.csv").read_text().splitlines()[1:]]
    assert groups == ["many"] + ["medium"] * 2 + ["few"] * 7


def test_save_predictions_match_the_transformers_model(run_dir, flags, idx_dir, tmp_path):
    """--save_predictions: one row per test image in dataset order; its numbers are those of the train_lt.py export
    loaded with transformers' auto classes (remote code) on the same images, and they add up to the metrics."""
    import csv

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from lt_utils.data import load_lt_dataset

    run_eval(run_dir / "final", "--save_predictions", "--top_k", "3", *flags, "--output_dir", tmp_path / "p")
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    metrics = read_metrics(tmp_path / "p")["metrics"]
    assert len(rows) == metrics["num_samples"] == 100 and [int(r["index"]) for r in rows] == list(range(100))
    assert 100 * sum(int(r["correct"]) for r in rows) / 100 == pytest.approx(metrics["accuracy"])
    ds, _ = load_lt_dataset("fashion_mnist_lt", data_dir=str(idx_dir), imb=10, max_per_class=40, val_per_class=5,
                            cache_dir=str(run_dir.parent / "hf_cache"))
    test = ds["test"]
    assert [r["label"] for r in rows] == [FASHION_NAMES[y] for y in test["label"]]
    processor = AutoImageProcessor.from_pretrained(run_dir / "final")
    model = AutoModelForImageClassification.from_pretrained(run_dir / "final", trust_remote_code=True).eval()
    with torch.no_grad():
        probs = model(**processor(list(test["image"]), return_tensors="pt")).logits.softmax(-1)
    top = probs.topk(3, dim=-1)
    for row, values, classes in zip(rows, top.values.tolist(), top.indices.tolist()):
        assert row["top_k_labels"].split("|") == [FASHION_NAMES[c] for c in classes]
        assert [float(v) for v in row["top_k_scores"].split("|")] == pytest.approx(values, abs=1e-5)
        assert row["prediction"] == FASHION_NAMES[classes[0]]


def test_data_flags_override_the_recorded_split(run_dir, flags, tmp_path):
    common = ("--many_threshold", "25", "--few_threshold", "10", *flags)
    run_eval(run_dir / "final", "--split", "validation", *common, "--output_dir", tmp_path / "val")
    saved = read_metrics(tmp_path / "val")
    # --split val, the split's name in earlier versions: the same split, the same numbers, recorded as validation
    run_eval(run_dir / "final", "--split", "val", *common, "--output_dir", tmp_path / "legacy")
    assert read_metrics(tmp_path / "legacy") == saved and saved["config"]["split"] == "validation"
    assert saved["metrics"]["num_samples"] == 50  # --val_per_class 5 recorded at training, x 10 classes
    assert saved["config"]["many_threshold"] == 25 and saved["config"]["dataset"]["imb"] == 10.0
    # train counts 40 30 23 18 14 11 8 6 5 4: > 25 many, < 10 few
    assert (saved["metrics"]["many_classes"], saved["metrics"]["medium_classes"], saved["metrics"]["few_classes"]) == (2, 4, 4)
    groups = [row.split(",")[3] for row in (tmp_path / "val" / "per_class.csv").read_text().splitlines()[1:]]
    assert groups == ["many"] * 2 + ["medium"] * 4 + ["few"] * 4


def test_passed_flags_are_only_the_ones_on_the_command_line(tmp_path):
    parser = eval_lt.get_args_parser()
    argv = ["RUN", "--imb", "100", "--split", "val"]
    passed = passed_flags(parser, argv, {"dataset", "imb", "max_per_class"})
    assert passed == {"imb"}
    args = parser.parse_args(argv)  # the real defaults are back after the sentinel parse
    assert args.dataset == "fashion_mnist_lt" and args.max_per_class is None
    merged = data_args_for(args, {"dataset": "cifar100_lt", "imb": 10.0, "max_per_class": 500}, passed)
    assert (merged.dataset, merged.imb, merged.max_per_class) == ("cifar100_lt", 100.0, 500)
    # the record: the export's LT split (config.json's lt_info) and the source files it was read from
    info = LTInfo(dataset="cifar10_lt", class_names=["a"], train_counts=[5], groups=["few"], imb=50.0, seed=3,
                  selection="lift")
    meta = {"lt_info": info, "dataset": {"data_dir": "/data/cifar"}}
    assert recorded_data_flags(meta) == {
        "dataset": "cifar10_lt", "imb": 50.0, "max_per_class": None, "imb_seed": 3, "selection": "lift",
        "val_per_class": 20, "val_source": "unused_train", "many_threshold": 100, "few_threshold": 20,
        "groups_from_imb": None, "train_val_split": None, "data_dir": "/data/cifar"}


def test_output_dirs_never_go_into_the_hub_cache(tmp_path):
    local = Target(name="runs/a/best", slug="a__best", export_dir=tmp_path / "a" / "best", local=True)
    hub = Target(name="user/lift-cifar", slug="user__lift-cifar", export_dir=tmp_path / "hub_cache" / "snap")
    zero_shot = Target(name="zero-shot openai/clip (single)", slug="zero_shot_clip_single", zero_shot="openai/clip")
    comparison = assign_output_dirs([local, hub, zero_shot], None, "test", "fivecrop", overwrite=False)
    assert local.output_dir == tmp_path / "a" / "best" / "eval_test_fivecrop"
    assert hub.output_dir == DEFAULT_OUTPUT_ROOT / "user__lift-cifar" / "eval_test_fivecrop"
    assert zero_shot.output_dir == DEFAULT_OUTPUT_ROOT / "zero_shot_clip_single" / "eval_test_fivecrop"
    assert comparison == DEFAULT_OUTPUT_ROOT / "comparison_eval_test_fivecrop.md"
    assert assign_output_dirs([hub], tmp_path / "out", "validation", "none", overwrite=False) is None
    assert hub.output_dir == tmp_path / "out"  # one target: --output_dir itself


@torch.no_grad()
def clip_logits_by_hand(clip_dir, pixel_values, class_names, templates=("a photo of a {}.",)):
    """transformers' CLIPModel: logits_per_image against one prompt per class (templates averaged as CLIP does)."""
    from transformers import AutoTokenizer, CLIPModel

    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    if len(templates) == 1:
        tokens = tokenizer([templates[0].format(n) for n in class_names], padding=True, return_tensors="pt")
        return clip(**tokens, pixel_values=pixel_values).logits_per_image
    text = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
        text.append(F.normalize(F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1).mean(0), dim=-1))
    image = F.normalize(clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    return clip.logit_scale.exp() * image @ torch.stack(text).t()


def test_zero_shot_equals_clip_logits_per_image(clip_dir):
    from lt_utils.prompts import IMAGENET_TEMPLATES
    from lt_utils.zeroshot import build_zero_shot

    pixels = random_pixels(4, image_size=32)
    names = ["maple_tree", "Ankle boot", "T-shirt/top"]
    model = build_zero_shot(clip_dir, names, "single")
    expected = clip_logits_by_hand(clip_dir, pixels, ["maple tree", "Ankle boot", "T-shirt/top"])
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), expected, rtol=1e-5, atol=1e-5)
    ensemble = build_zero_shot(clip_dir, names[:2], "ensemble")
    expected = clip_logits_by_hand(clip_dir, pixels, ["maple tree", "Ankle boot"], IMAGENET_TEMPLATES)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(pixels), expected, rtol=1e-5, atol=1e-5)
    assert model.spec.image_size == 32 and model.spec.interpolation == "bicubic"


def test_zero_shot_evaluation_matches_a_hand_computation(clip_dir, idx_dir, run_dir, flags, tmp_path):
    from lt_utils.data import load_lt_dataset
    from lt_utils.models import CLIP_MEAN, CLIP_STD
    from lt_utils.transforms import build_eval_transform

    run_eval("--zero_shot", clip_dir, "--dataset", "fashion_mnist_lt", "--imb", "10", "--max_per_class", "40",
             "--val_per_class", "5", *flags, "--output_dir", tmp_path / "zs")
    saved = read_metrics(tmp_path / "zs")
    ds, info = load_lt_dataset("fashion_mnist_lt", imb=10, data_dir=idx_dir, max_per_class=40, val_per_class=5,
                               cache_dir=run_dir.parent / "hf_cache")
    transform = build_eval_transform(32, CLIP_MEAN, CLIP_STD, "bicubic")  # the CLIP processor's mean/std/resample
    pixels = torch.stack([transform(image) for image in ds["test"]["image"]])
    labels = torch.tensor(ds["test"]["label"])
    logits = clip_logits_by_hand(clip_dir, pixels, FASHION_NAMES)
    correct = logits.argmax(1) == labels
    assert saved["metrics"]["accuracy"] == pytest.approx(100 * correct.double().mean().item(), abs=1e-9)
    per_class = [100 * correct[labels == c].double().mean().item() for c in range(10)]
    assert saved["metrics"]["per_class_acc"] == pytest.approx(per_class, abs=1e-9)
    assert saved["metrics"]["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert saved["config"]["prompt_template"] == "single" and saved["config"]["model"] == str(clip_dir)


def test_two_runs_are_compared_in_one_table(run_dir, flags, tmp_path, capsys):
    run_eval(run_dir, run_dir / "final", *flags, "--output_dir", tmp_path / "cmp")
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert [row.split(" | ")[0] for row in rows] == [f"| {run_dir / 'best'}", f"| {run_dir / 'final'}"]
    assert (tmp_path / "cmp" / "comparison.md").read_text() in table
    best, final = read_metrics(tmp_path / "cmp" / "run__best"), read_metrics(tmp_path / "cmp" / "run__final")
    assert best["config"]["model"] == str(run_dir / "best") and final["config"]["model"] == str(run_dir / "final")
    assert f"{final['metrics']['accuracy']:.2f}" == rows[1].split(" | ")[1]


def copy_export(run_dir, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(run_dir / "final", dst, ignore=shutil.ignore_patterns("eval_*"))
    return dst


def relabel(export):
    config = json.loads((export / "config.json").read_text())
    config["id2label"]["3"] = "Gown"
    (export / "config.json").write_text(json.dumps(config))
    return export


@pytest.mark.parametrize("case, message", [
    ("label_mismatch", "label 3 is 'Gown' in the export but 'Dress' in fashion_mnist_lt"),
    ("missing_dir", "not found"),
    ("partial_dir", "missing model.safetensors"),
    ("unknown_split", "--split dev is not a valid choice; choose one of train, validation, test"),
    ("zero_shot_without_dataset", "--zero_shot alone needs --dataset"),
    ("existing_output", "already exists; pass --overwrite"),
])
def test_bad_input_is_one_error_line_and_exit_2(run_dir, flags, tmp_path, capsys, case, message):
    run, extra = run_dir / "final", []
    if case == "label_mismatch":
        run = relabel(copy_export(run_dir, tmp_path, "relabelled"))
    elif case == "missing_dir":
        run = tmp_path / "no_such_export"
    elif case == "partial_dir":
        run = copy_export(run_dir, tmp_path, "partial")
        (run / "model.safetensors").unlink()
    elif case == "unknown_split":
        extra = ["--split", "dev"]
    elif case == "zero_shot_without_dataset":
        run, extra = None, ["--zero_shot", "openai/clip-vit-base-patch16"]
    elif case == "existing_output":
        (tmp_path / "taken").mkdir()
        extra = ["--output_dir", tmp_path / "taken"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_eval(*([run] if run else []), *flags, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and message in error_lines[0]
    if case == "label_mismatch":
        assert not (run / "eval_test").exists()


def test_evaluating_a_soup_puts_its_numbers_on_its_card(run_dir, flags, tmp_path, monkeypatch):
    """A uniform soup has no numbers; evaluated on its recorded split, its metrics.json and model card get them
    (huggingface_hub reads the model-index), while a partial evaluation changes neither; the same soup.py command
    with --push_to_hub then publishes them."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    soup = tmp_path / "soup"
    assert run_cli("soup.py", run_dir / "best", run_dir / "final", "--output_dir", soup).code == 0
    assert not (soup / "metrics.json").exists() and ModelCard.load(soup / "README.md").data.eval_results is None
    run_eval(soup, "--split", "test", *flags)
    test = read_metrics(soup / "eval_test")["metrics"]
    assert json.loads((soup / "metrics.json").read_text()) == {"test": test}
    results = {(r.dataset_split, r.metric_type): r.metric_value
               for r in ModelCard.load(soup / "README.md").data.eval_results}
    assert results[("test", "accuracy")] == round(test["accuracy"], 4)
    assert results[("test", "mean_class_accuracy")] == round(test["mean_class_acc"], 4)
    card = (soup / "README.md").read_bytes()
    run_eval(soup, "--split", "validation", "--max_eval_samples", "10", *flags)  # a part of it: not the model's numbers
    assert (soup / "eval_validation" / "metrics.json").is_file() and (soup / "README.md").read_bytes() == card
    assert list(json.loads((soup / "metrics.json").read_text())) == ["test"]

    # the same soup.py command with --push_to_hub: nothing merged again, the evaluated soup (its card) pushed, once
    pushed = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **_: huggingface_hub.RepoUrl(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda repo_id, folder_path, **_: pushed.append(
        (repo_id, folder_path, ModelCard.load(Path(folder_path) / "README.md").data.eval_results)))
    weights = (soup / "model.safetensors").read_bytes()
    argv = [run_dir / "best", run_dir / "final", "--output_dir", soup, "--push_to_hub", "--hub_model_id", "you/soup"]
    with reachable_hub(monkeypatch, tmp_path):
        first, again = run_cli("soup.py", *argv, env=ONLINE), run_cli("soup.py", *argv, env=ONLINE)
        other = run_cli("soup.py", *argv, "--mode", "progressive", env=ONLINE)
    assert first.code == 0 and "nothing to merge" in first.out and (soup / "model.safetensors").read_bytes() == weights
    assert [(repo, folder) for repo, folder, _ in pushed] == [("you/soup", str(soup))]
    assert {(r.dataset_split, r.metric_type): r.metric_value for r in pushed[0][2]} == results
    assert again.code == 0 and "nothing to push" in again.out and len(pushed) == 1
    assert other.code == 2 and "already exists" in other.err  # another recipe is another soup
