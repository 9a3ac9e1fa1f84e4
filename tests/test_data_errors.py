"""Bad input to data_scripts/build_lt.py: one `error:` line naming the value or file, exit 2, no traceback, no output dir."""
import pytest

from helpers_cli import run_cli
from helpers_data import write_cifar100, write_idx_dir, write_oltr
from lt_utils.data import load_lt_dataset
from lt_utils.errors import UserError


CASES = ["imb_below_one", "empty_class", "missing_root", "missing_file", "missing_list", "label_out_of_range",
         "missing_image", "unreadable_image", "output_exists"]


def _cases(tmp):
    idx = write_idx_dir(tmp / "idx", per_class_train=8, per_class_test=1)
    cifar = write_cifar100(tmp / "cifar", per_class_train=2, per_class_test=1)
    (cifar / "cifar-100-python" / "meta").unlink()
    root = tmp / "lists"
    train, test = write_oltr(root, [3, 2, 1], prefix="train"), write_oltr(root, [1, 1, 1], prefix="test", seed=1)
    names = tmp / "names.txt"
    names.write_text("a\nb\nc\n")
    bad_label = tmp / "bad_label.txt"
    listed = train.read_text().splitlines()
    bad_label.write_text("\n".join(listed[:-1] + [listed[-1].rsplit(" ", 1)[0] + " 7"]) + "\n")
    missing_image = tmp / "missing_image.txt"
    missing_image.write_text(train.read_text() + "train/cls_1/gone.png 1\n")
    (root / "train" / "cls_2" / "broken.png").write_bytes(b"not an image at all")
    broken_image = tmp / "broken_image.txt"
    broken_image.write_text(train.read_text() + "train/cls_2/broken.png 2\n")
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    fm = ["--dataset", "fashion_mnist", "--data_dir", idx]
    lists = ["--dataset", "imagenet_lt", "--data_dir", root, "--test_list", test, "--class_names_file", names]
    return {
        "imb_below_one": (fm + ["--imb", "0.5"], "--imb 0.5 is out of range: must be >= 1"),
        "empty_class": (fm + ["--imb", "100", "--max_per_class", "50"], "class 8 (Bag) would get 0"),
        "missing_root": (["--dataset", "cifar100", "--data_dir", tmp / "nope"], f"{tmp / 'nope'} does not exist"),
        "missing_file": (["--dataset", "cifar100", "--data_dir", cifar], "cifar-100-python/meta not found"),
        "missing_list": (lists + ["--train_list", tmp / "absent.txt"], f"{tmp / 'absent.txt'} not found"),
        "label_out_of_range": (lists + ["--train_list", bad_label], f"{bad_label}: label 7 at entry 5"),
        "missing_image": (lists + ["--train_list", missing_image], f"{root}/train/cls_1/gone.png (listed in"),
        "unreadable_image": (lists + ["--train_list", broken_image], f"{root}/train/cls_2/broken.png (from"),
        "output_exists": (fm + ["--imb", "2", "--output_dir", existing], "already exists"),
    }


def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path):
    """Every case through build_lt.py's command line (in this process: run_cli), in one test that reports them all."""
    cases = _cases(tmp_path)
    assert sorted(cases) == sorted(CASES)
    problems = []
    for name, (args, _) in cases.items():
        out = ["--output_dir", tmp_path / "out" / name] if "--output_dir" not in args else []
        proc = run_cli("data_scripts/build_lt.py", *args, *out, "--cache_dir", tmp_path / "cache")
        stderr = proc.stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        ok = (
            proc.returncode == 2 and "Traceback" not in stderr and len(errors) == 1
            and errors[0] == stderr.strip().splitlines()[-1] and cases[name][1] in errors[0]
        )
        if not ok:
            problems.append(f"{name}: rc={proc.returncode} stderr={stderr[-500:]!r}")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no output, no temp dirs
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["keep.txt"]  # untouched


def test_more_bad_input_in_process(tmp_path):
    idx = write_idx_dir(tmp_path / "idx", per_class_train=8, per_class_test=1)
    root = tmp_path / "lists"
    test = write_oltr(root, [1, 1], prefix="test")
    malformed = tmp_path / "malformed.txt"
    malformed.write_text("test/cls_0/test_0_0.png 0\njust_a_path.png\n")
    cache = dict(cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"class 0 \(T-shirt/top\) has 8 source images but the split needs 9"):
        load_lt_dataset("fashion_mnist", imb=2, data_dir=idx, max_per_class=9, **cache)
    with pytest.raises(UserError, match="malformed.txt:2: expected 'relative/path label'"):
        load_lt_dataset("imagenet_lt", data_dir=root, train_list=malformed, test_list=test, **cache)
    with pytest.raises(UserError, match=r"needs --data_dir \(the image root\), --train_list and --test_list"):
        load_lt_dataset("inat2018", data_dir=root, test_list=test, **cache)
    with pytest.raises(UserError, match="few_threshold=20 exceeds"):
        load_lt_dataset("fashion_mnist", data_dir=idx, many_threshold=10, few_threshold=20, **cache)
    with pytest.raises(UserError, match="max_per_class=0"):
        load_lt_dataset("fashion_mnist", data_dir=idx, max_per_class=0, **cache)
    with pytest.raises(UserError, match="val_source='val'"):
        load_lt_dataset("fashion_mnist", data_dir=idx, val_source="val", **cache)
