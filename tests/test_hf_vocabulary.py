"""transformers' image-classification vocabulary: its lr schedules (step by step against transformers.get_scheduler),
its flag names as aliases of the project's, --imb none (a source already long-tailed), the image size of
transformers' ResNets."""
import json

import numpy as np
import pytest
import torch

from lt_utils.schedule import HF_SCHEDULES, lr_at


def _transformers_lrs(name, warmup, total, base_lr):
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name,warmup", [(name, warmup) for name in (*HF_SCHEDULES, "cosine", "constant")
                                         for warmup in (0, 7)])
def test_schedules_equal_transformers_get_scheduler_at_every_step(name, warmup):
    total, base_lr = 50, 0.03
    if name in ("cosine", "constant") and warmup:
        # the project's cosine / constant warm up (step + 1) / warmup, transformers' step / warmup (its constant has
        # no warm-up: constant_with_warmup): one step apart in the warm-up, equal after it
        expected = _transformers_lrs("cosine" if name == "cosine" else "constant_with_warmup", warmup, total, base_lr)
        ours = [lr_at(step, base_lr, total, name, warmup) for step in range(total)]
        assert ours[:warmup - 1] == pytest.approx(expected[1:warmup], rel=1e-12)
        assert ours[warmup:] == pytest.approx(expected[warmup:], rel=1e-12, abs=1e-15)
        return
    expected = _transformers_lrs(name, warmup, total, base_lr)
    ours = [lr_at(step, base_lr, total, name, warmup) for step in range(total)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------------------ --imb none
# A source already long-tailed (as many LT benchmarks are published on the Hub): 4 classes with 40 / 15 / 6 / 2 train
# images, 3 validation and 3 test images each; every image's pixels spell its index in its split.
LT_COUNTS = [40, 15, 6, 2]


def write_lt_source(root, splits=("train", "validation", "test")):
    import datasets
    import PIL.Image

    from helpers_hf import CLASS_NAMES, index_image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    out = {}
    for split in splits:
        labels = rng.permutation(np.repeat(np.arange(4), LT_COUNTS if split == "train" else 3))
        out[split] = datasets.Dataset.from_dict(
            {"image": [PIL.Image.fromarray(index_image(i)) for i in range(len(labels))], "label": labels.tolist()},
            features=features)
    datasets.DatasetDict(out).save_to_disk(str(root))
    return root, {split: part["label"] for split, part in out.items()}


@pytest.fixture(scope="module")
def lt_source(tmp_path_factory):
    return write_lt_source(tmp_path_factory.mktemp("lt_source") / "zoo")


@pytest.fixture(scope="module")
def zoo_lt(lt_source, tmp_path_factory):
    """build_lt.py --dataset_name user/repo --imb none: a Hub id runs datasets.load_dataset (offline: the local
    source stands in for the Hub's answer). Returns (the saved split's folder, the command's result)."""
    import datasets

    from helpers_cli import run_cli

    root, _ = lt_source
    out = tmp_path_factory.mktemp("zoo_lt") / "zoo_lt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: datasets.load_from_disk(str(root)))
        result = run_cli("data_scripts/build_lt.py", "--dataset_name", "someone/zoo-lt", "--imb", "none",
                         "--validation_split", "validation", "--many_threshold", "20", "--few_threshold", "5",
                         "--cache_dir", out.parent / "cache", "--output_dir", out)
    assert result.code == 0, result.err
    return out, result


def test_imb_none_keeps_a_hub_datasets_own_counts_through_build_lt_and_load_from_disk(lt_source, zoo_lt):
    """The saved split reads back with the plain datasets.load_from_disk, its splits named as transformers and the
    Hub name them."""
    import datasets

    from helpers_hf import held_indices

    (_, labels), (out, result) = lt_source, zoo_lt
    assert "imb none (the source's counts: 20)" in result.out
    assert "splits: train 63 | validation 12 | test 12" in result.out
    saved = datasets.load_from_disk(str(out))
    assert list(saved) == ["train", "validation", "test"]
    assert saved["validation"]["label"] == labels["validation"]  # the source's validation split, as it is
    assert np.bincount(saved["train"]["label"]).tolist() == LT_COUNTS  # every source train image, none dropped
    assert sorted(held_indices(saved["train"])) == list(range(63))
    record = json.loads((out / "lt_info.json").read_text())
    assert record["train_counts"] == LT_COUNTS and record["imb"] is None
    assert record["groups"] == ["many", "medium", "medium", "few"]  # many > 20, few < 5, from the source's counts
    # the recorded flags rebuild the same split (eval_lt.py, resume): --imb none, not a ratio
    from lt_utils.config import recorded_flags

    assert recorded_flags(record)["imb"] is None


def save_with_the_earlier_split_name(saved_dir, legacy_dir):
    """`saved_dir` as the previous version wrote it: the validation split saved as "val", the split record's per-split
    values (lt_info.json, each split's embedded info) keyed "val"."""
    import datasets

    def earlier(mapping):
        return {"val" if k == "validation" else k: v for k, v in mapping.items()}

    record = json.loads((saved_dir / "lt_info.json").read_text())
    record = {**record, "split_sizes": earlier(record["split_sizes"]), "index_hashes": earlier(record["index_hashes"])}
    ds = datasets.load_from_disk(str(saved_dir))
    for part in ds.values():
        part.info.description = json.dumps(record)
    datasets.DatasetDict(earlier(ds)).save_to_disk(str(legacy_dir))
    (legacy_dir / "lt_info.json").write_text(json.dumps(record))
    return record


def test_a_split_saved_with_the_earlier_name_val_trains_and_evaluates_as_validation(zoo_lt, tmp_path):
    """A --data_dir / --dataset folder an earlier version saved (its split "val"): read as validation by every
    command; eval_lt.py --split val and --split validation are one split, with the same numbers."""
    import datasets

    from helpers_cli import run_cli
    from helpers_train import TINY_VIT, export_config
    from lt_utils.data import load_lt_dataset

    current, legacy = zoo_lt[0], tmp_path / "legacy"
    earlier = save_with_the_earlier_split_name(current, legacy)
    assert sorted(datasets.load_from_disk(str(legacy))) == ["test", "train", "val"]
    ds, info = load_lt_dataset(str(legacy))
    assert list(ds) == ["train", "validation", "test"] and ds["validation"].num_rows == 12
    assert info.index_hashes["validation"] == earlier["index_hashes"]["val"] and "val" not in info.split_sizes
    run = tmp_path / "run"
    trained = run_cli("train_lt.py", "--dataset", legacy, "--model_name_or_path", TINY_VIT, "--from_scratch", "true",
                      "--head_init", "random", "--method", "full_all", "--max_train_steps", "2", "--eval_steps", "1",
                      "--per_device_train_batch_size", "16", "--num_workers", "0", "--output_dir", run)
    assert trained.code == 0, trained.err
    assert json.loads((run / "best" / "metrics.json").read_text())["validation"]["num_samples"] == 12
    assert export_config(run / "best")["lt_info"]["index_hashes"]["validation"] == earlier["index_hashes"]["val"]
    numbers = {}
    for split, data in (("val", legacy), ("validation", current)):
        evaluated = run_cli("eval_lt.py", run / "best", "--dataset", data, "--split", split, "--num_workers", "0",
                            "--output_dir", tmp_path / split)
        assert evaluated.code == 0, evaluated.err
        numbers[split] = json.loads((tmp_path / split / "metrics.json").read_text())
    assert numbers["val"]["metrics"] == numbers["validation"]["metrics"]
    assert numbers["val"]["config"]["split"] == "validation" and numbers["val"]["metrics"]["num_samples"] == 12


def test_imb_none_on_image_folders_and_lists_with_the_transformers_folder_names(tmp_path):
    """--train_dir / --validation_dir (transformers' names) are --data_dir / --val_dir; --imb none keeps the folders'
    counts. OLTR lists always keep theirs, so --imb none is accepted there too."""
    from helpers_cli import run_cli
    from helpers_data import write_image_folder, write_oltr

    train = write_image_folder(tmp_path / "train", [7, 3, 1])
    write_image_folder(tmp_path / "val", [2, 2, 2], seed=1)
    write_image_folder(tmp_path / "test", [2, 2, 2], seed=2)
    out = tmp_path / "folder_lt"
    result = run_cli("data_scripts/build_lt.py", "--dataset", "imagefolder_lt", "--train_dir", train,
                     "--validation_dir", tmp_path / "val", "--test_dir", tmp_path / "test", "--imb", "none",
                     "--many_threshold", "5", "--few_threshold", "2", "--cache_dir", tmp_path / "cache",
                     "--output_dir", out)
    assert result.code == 0, result.err
    assert "splits: train 11 | validation 6 | test 6" in result.out
    record = json.loads((out / "lt_info.json").read_text())
    assert record["train_counts"] == [7, 3, 1] and record["groups"] == ["many", "medium", "few"]

    from lt_utils.data import load_lt_dataset

    write_oltr(tmp_path / "lists", [5, 2], prefix="train")
    write_oltr(tmp_path / "lists", [1, 1], prefix="test")
    _, info = load_lt_dataset("places_lt", imb=None, data_dir=str(tmp_path / "lists"),
                              train_list=str(tmp_path / "lists" / "train.txt"),
                              test_list=str(tmp_path / "lists" / "test.txt"), cache_dir=str(tmp_path / "cache"))
    assert info.train_counts == [5, 2]


def test_imb_none_on_a_balanced_source_reports_absent_groups_as_none(tmp_path):
    """Not long-tailed: every class is few (5 images, few < 20), so many and medium have no class; their accuracies
    are None (absent), never 0 or a crash."""
    from lt_utils.data import load_lt_dataset
    from lt_utils.metrics import compute_lt_metrics

    from helpers_data import write_image_folder

    write_image_folder(tmp_path / "train", [5, 5, 5])
    write_image_folder(tmp_path / "test", [2, 2, 2], seed=2)
    ds, info = load_lt_dataset("imagefolder_lt", imb=None, data_dir=str(tmp_path / "train"),
                               test_dir=str(tmp_path / "test"), cache_dir=str(tmp_path / "cache"))
    assert info.train_counts == [5, 5, 5] and info.group_counts() == {"many": 0, "medium": 0, "few": 3}
    labels = torch.tensor(ds["test"]["label"])
    metrics = compute_lt_metrics(labels, labels, 3, info.groups)
    assert metrics["many_acc"] is None and metrics["medium_acc"] is None and metrics["few_acc"] == 100.0
    assert metrics["many_classes"] == metrics["medium_classes"] == 0


def test_train_val_split_holds_out_a_fraction_of_each_class_before_the_lt_rule(lt_source, tmp_path):
    from lt_utils.data import load_lt_dataset
    from lt_utils.errors import UserError

    from helpers_hf import held_indices

    root, labels = lt_source
    ds, info = load_lt_dataset(None, dataset_name=str(root), imb=None, train_val_split=0.25, selection="first",
                               cache_dir=str(tmp_path / "cache"))
    # ceil(0.25 n) of each class (the last of its order), at least one image left for train
    assert np.bincount(ds["validation"]["label"], minlength=4).tolist() == [10, 4, 2, 1]
    assert info.train_counts == [30, 11, 4, 1] and info.train_val_split == 0.25
    assert not set(held_indices(ds["validation"])) & set(held_indices(ds["train"]))
    with pytest.raises(UserError, match="has its own validation split; drop the flag"):
        load_lt_dataset(None, dataset_name=str(root), validation_split="validation", train_val_split=0.25,
                        cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------ transformers ResNet image size
def write_tiny_resnet(path, shortest_edge=None):
    """A transformers ResNet config (random init) and, when given, a ResNet image processor of that size (as
    microsoft/resnet-50 ships, at 224)."""
    from transformers import ConvNextImageProcessor, ResNetConfig

    ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic").save_pretrained(path)
    if shortest_edge:
        ConvNextImageProcessor(size={"shortest_edge": shortest_edge}).save_pretrained(path)
    return path


def test_a_transformers_resnet_trains_and_exports_at_its_processors_image_size(idx_dir, tmp_path):
    from transformers import AutoImageProcessor

    from helpers_cli import run_cli
    from helpers_train import TINY_VIT, export_config, export_tensors, tiny_train_args

    model = write_tiny_resnet(tmp_path / "resnet32", shortest_edge=32)
    out = tmp_path / "run"
    args = [str(model) if a == str(TINY_VIT) else a for a in tiny_train_args(idx_dir, out)]
    result = run_cli("train_lt.py", *args, "--head_type", "linear", "--max_train_steps", "1",
                     "--eval_steps", "none")
    assert result.code == 0, result.err
    assert export_config(out / "final")["backbone_spec"]["image_size"] == 32
    processor = AutoImageProcessor.from_pretrained(out / "final")  # what the Hub client feeds the export
    assert processor.crop_size["height"] == 32

    # stage 2 on other classes (a folder already long-tailed, transformers' folder flag names): the export's head is
    # for its 10 classes, so --ignore_mismatched_sizes keeps its backbone and gives it a new 3-class head
    from helpers_data import write_image_folder

    train = write_image_folder(tmp_path / "train", [6, 3, 2])
    write_image_folder(tmp_path / "test", [2, 2, 2], seed=2)
    stage2 = ["--dataset", "imagefolder_lt", "--train_dir", train, "--test_dir", tmp_path / "test", "--imb", "none",
              "--val_per_class", "0", "--init_from", out / "final", "--method", "head", "--head_init", "random",
              "--max_train_steps", "1", "--eval_steps", "none", "--num_workers", "0", "--output_dir",
              tmp_path / "stage2", "--cache_dir", tmp_path / "hf_cache"]
    refused = run_cli("train_lt.py", *stage2)
    assert refused.code == 2 and refused.err.strip().splitlines()[-1].endswith(
        "pass --ignore_mismatched_sizes to keep its backbone with a new head")
    result = run_cli("train_lt.py", *stage2, "--ignore_mismatched_sizes")
    assert result.code == 0, result.err
    config = export_config(tmp_path / "stage2" / "final")
    assert config["id2label"] == {"0": "cls00", "1": "cls01", "2": "cls02"} and config["lt_info"]["imb"] is None
    assert config["head_init"]["init"] == "random"  # the new head's init, not the dropped one of --init_from
    assert "(the source's own class counts)" in (tmp_path / "stage2" / "final" / "README.md").read_text()
    # eval_lt.py takes transformers' split name, the one the export records
    evaluated = run_cli("eval_lt.py", out / "final", "--split", "validation", "--num_workers", "0",
                        "--output_dir", tmp_path / "eval")
    assert evaluated.code == 0, evaluated.err
    recorded = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert recorded["config"]["split"] == "validation"
    assert recorded["config"]["split_hash"] == export_config(out / "final")["lt_info"]["index_hashes"]["validation"]
    before, after = export_tensors(out / "final"), export_tensors(tmp_path / "stage2" / "final")
    assert after["head.weight"].shape == (3, 16)
    backbone = [k for k in before if k.startswith("backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)


def test_image_size_sets_a_cnns_size_and_is_refused_for_a_vit(tmp_path, vit_dir):
    from lt_utils.errors import UserError
    from lt_utils.models import build_lt_model

    plain = write_tiny_resnet(tmp_path / "plain")
    assert build_lt_model(plain, 3, from_scratch=True).spec.image_size == 224  # no image processor: ImageNet's size
    sized = build_lt_model(write_tiny_resnet(tmp_path / "sized", shortest_edge=32), 3, from_scratch=True,
                           image_size=48).spec
    assert (sized.image_size, sized.eval_resize) == (48, 54)
    with pytest.raises(UserError, match=r"--image_size 48 applies to CNN backbones \(cifar_resnet, resnet\); a vit "):
        build_lt_model(vit_dir, 3, from_scratch=True, image_size=48)


def test_trust_remote_code_reaches_the_checkpoints_image_processor(tmp_path, vit_dir):
    """A checkpoint whose image processor is its own code (auto_map): refused with the fix named (its defaults would
    silently differ), used with the flag."""
    import shutil

    from lt_utils.errors import UserError
    from lt_utils.models import build_lt_model

    model = shutil.copytree(vit_dir, tmp_path / "remote-vit")
    (model / "image_processing_tiny.py").write_text(
        "from transformers import ViTImageProcessor\n\n\nclass TinyProcessor(ViTImageProcessor):\n    pass\n")
    (model / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "TinyProcessor", "auto_map": {"AutoImageProcessor": "image_processing_tiny.TinyProcessor"},
        "image_mean": [0.25, 0.25, 0.25], "image_std": [0.5, 0.5, 0.5]}))
    with pytest.raises(UserError, match="if you trust its code, pass --trust_remote_code$"):
        build_lt_model(model, 3, from_scratch=True)
    spec = build_lt_model(model, 3, from_scratch=True, trust_remote_code=True).spec
    assert spec.image_mean == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("extra, expect", [
    (["--ignore_mismatched_sizes"], "--ignore_mismatched_sizes applies to --init_from"),
    (["--lr_scheduler_type", "linear", "--min_lr_ratio", "0.1"],
     "--min_lr_ratio 0.1 does not apply to --lr_scheduler_type linear; drop it or use --lr_scheduler_type cosine"),
    (["--imb", "none", "--groups_from_imb", "100"], "keeps its source's counts (lists, --imb none): drop the flag"),
])
def test_flags_that_do_not_apply_are_refused_in_one_line(idx_dir, tmp_path, extra, expect):
    from helpers_cli import run_cli
    from helpers_train import tiny_train_args

    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, tmp_path / "run", *extra))
    assert result.code == 2 and expect in result.err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_a_preset_takes_the_transformers_names_too(tmp_path):
    from lt_utils.config import build_train_parser, load_preset
    from lt_utils.errors import UserError

    preset = tmp_path / "p.yaml"
    preset.write_text("train_dir: my/train\nvalidation_dir: my/val\nimb: none\n")
    assert load_preset(preset, build_train_parser()) == {"data_dir": "my/train", "val_dir": "my/val", "imb": None}
    preset.write_text("train_dir: a\ndata_dir: b\n")
    with pytest.raises(UserError, match="sets both data_dir and its alias train_dir; keep one"):
        load_preset(preset, build_train_parser())
