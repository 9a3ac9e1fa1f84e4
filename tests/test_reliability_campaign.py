"""A generated campaign of hostile sources and contradicting configs, judged by one rule.

Cases are not listed one by one: each class of input (corrupted sources x readers, contradictions x configs) is a
small list of corruptions crossed with the readers or configs it applies to. Every case runs the real command line
(data_scripts/build_lt.py, in-process) and is judged by `judge`: either a refusal (exit status != 0, exactly one
`error:` line with a fix after `;`, no traceback) or a correct build (exit 0 and the expected class / split counts),
and in both cases every file that existed before is byte-identical afterwards.
"""
import gzip
import json
import os
import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest

from helpers_cli import run_cli
from helpers_data import idx_bytes, split_digest, write_cifar10, write_cifar100, write_image_folder, write_oltr
from helpers_faults import one_error_line, tree_digest
from helpers_train import TINY_VIT

BUILD = "data_scripts/build_lt.py"


# ------------------------------------------------------------------------------------------------ clean sources
@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One clean copy of each source format; every case copies one and corrupts the copy."""
    root = tmp_path_factory.mktemp("clean")
    write_idx(root / "idx", np.tile(np.arange(10), 6), np.tile(np.arange(10), 2))
    write_idx(root / "idx_gz", np.tile(np.arange(10), 6), np.tile(np.arange(10), 2), gz=True)
    write_cifar10(root / "cifar10", per_class_train=5, per_class_test=2)
    write_cifar100(root / "cifar100", per_class_train=2, per_class_test=1)
    oltr = root / "oltr"
    write_oltr(oltr, [6, 4, 3], prefix="train")
    write_oltr(oltr, [2, 2, 2], seed=1, prefix="test")
    (oltr / "classnames.txt").write_text("n00000001 apple\nn00000002 bear\nn00000003 car\n")
    write_image_folder(root / "folder", [6, 5, 4])
    write_idx(root / "idx60", np.tile(np.arange(10), 60), np.tile(np.arange(10), 2))
    from helpers_hf import write_arrow, write_imagefolder

    write_imagefolder(root / "hf_folder")
    write_arrow(root / "hf_arrow")
    (root / "hf_arrow" / "classes.txt").write_text("apple\nbear\ncat\ndog\n")
    assert run_cli(BUILD, *argv_for("idx", root / "idx"), "--output_dir", root / "saved",
                   "--cache_dir", root / "cache").code == 0
    return root


def write_idx(root, train_labels, test_labels, gz=False):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (len(labels), 28, 28))), ("labels-idx1", labels)):
            raw = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)


def bomb_png(width=30000, height=30000):
    """A valid PNG header of a 900-megapixel image with almost no data: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ corruptions
def _pickle_edit(name, edit):
    def apply(folder):
        path = next(folder.rglob(name))
        d = pickle.loads(path.read_bytes(), encoding="bytes")
        path.write_bytes(pickle.dumps(edit(d), protocol=2))
    return apply


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _set(key, value):
    return lambda d: {**d, key: value(d) if callable(value) else value}


def _write(name, data):
    """Replace the file `name` (or `name.gz`, whose content is then read and written compressed) by `data`."""
    def apply(folder):
        path = next(p for p in folder.rglob(name + "*") if p.name in (name, name + ".gz"))
        zipped = path.suffix == ".gz"
        old = gzip.decompress(path.read_bytes()) if zipped else path.read_bytes()
        new = data(old) if callable(data) else data
        path.write_bytes(gzip.compress(new) if zipped else new)
    return apply


def _not_gzip(name):
    def apply(folder):
        raw = folder / name
        if raw.exists():
            raw.rename(folder / (name + ".gz"))
        else:
            (folder / (name + ".gz")).write_bytes(idx_bytes(np.zeros((60, 28, 28))))
    return apply


def _symlink_dangling(name):
    def apply(folder):
        path = next(p for p in folder.rglob(name + "*") if p.name in (name, name + ".gz"))
        path.unlink()
        path.symlink_to(folder / "no_such_file")
    return apply


def _replace_by_folder(name):
    def apply(folder):
        path = next(p for p in folder.rglob(name + "*") if p.name in (name, name + ".gz"))
        path.unlink()
        path.mkdir()
    return apply


def _idx_labels(split, labels):
    return _write(f"{split}-labels-idx1-ubyte", idx_bytes(np.asarray(labels)))


IDX_CASES = {
    "train label 10": (_idx_labels("train", [*range(10)] * 5 + [10] * 10), "label 10"),
    "test label 200": (_idx_labels("t10k", [*range(10)] + [200] * 10), "label 200"),
    "labels 2-D": (_write("train-labels-idx1-ubyte", idx_bytes(np.zeros((60, 2)))), "labels"),
    "images 2-D": (_write("train-images-idx3-ubyte", idx_bytes(np.zeros((60, 784)))), "images"),
    "images 4-D": (_write("t10k-images-idx3-ubyte", idx_bytes(np.zeros((20, 28, 28, 1)))), "images"),
    "truncated images": (_write("train-images-idx3-ubyte", lambda b: b[:-100]), "truncated"),
    "truncated header": (_write("train-labels-idx1-ubyte", lambda b: b[:6]), "train-labels"),
    "bad magic": (_write("t10k-labels-idx1-ubyte", lambda b: b"\x01" + b[1:]), "magic"),
    "int32 dtype": (_write("train-labels-idx1-ubyte", lambda b: b[:2] + b"\x0c" + b[3:]), "uint8"),
    "empty file": (_write("t10k-images-idx3-ubyte", b""), "t10k-images"),
    "count mismatch": (_idx_labels("train", [*range(10)] * 5), "labels"),
    "no images": (_write("t10k-images-idx3-ubyte", idx_bytes(np.zeros((0, 28, 28)))), "t10k"),
    "dangling symlink": (_symlink_dangling("train-images-idx3-ubyte"), "train-images"),
    "folder in place": (_replace_by_folder("t10k-labels-idx1-ubyte"), "t10k-labels"),
    "gz not gzip": (_not_gzip("train-images-idx3-ubyte"), "train-images"),
    "huge header": (_write("train-images-idx3-ubyte", lambda b: b[:4] + struct.pack(">III", 2**31, 2**31, 2**31) + b[16:]),
                    "train-images"),
}

def cifar_corruptions(k):
    """The corruptions of a CIFAR layout `k` (CIFAR_KEYS): file and key names differ, the classes do not."""
    lab, names, n = k["labels"].encode(), k["names"].encode(), k["n"]
    return {
        "no data key": (_pickle_edit(k["train"], _drop(b"data")), "data"),
        "no label key": (_pickle_edit(k["test"], _drop(lab)), k["labels"]),
        "labels short": (_pickle_edit(k["train"], _set(lab, lambda d: d[lab][:-1])), "labels"),
        "rows of 3071": (_pickle_edit(k["test"], _set(b"data", lambda d: d[b"data"][:, :-1])), "3072"),
        "data float": (_pickle_edit(k["train"], _set(b"data", lambda d: d[b"data"].astype(np.float32) * 1.5)), "uint8"),
        "data 1-D": (_pickle_edit(k["train"], _set(b"data", lambda d: d[b"data"].ravel())), "3072"),
        "label out of range": (_pickle_edit(k["train"], _set(lab, lambda d: [n] + d[lab][1:])), f"label {n}"),
        "label negative": (_pickle_edit(k["test"], _set(lab, lambda d: [-1] + d[lab][1:])), "label -1"),
        "label text": (_pickle_edit(k["test"], _set(lab, lambda d: ["x"] + d[lab][1:])), "labels"),
        "one name fewer": (_pickle_edit(k["meta"], _set(names, lambda d: d[names][:-1])), "class names"),
        "one name more": (_pickle_edit(k["meta"], _set(names, lambda d: d[names] + [b"extra"])), "class names"),
        "duplicate names": (_pickle_edit(k["meta"], _set(names, lambda d: d[names][:-1] + d[names][:1])), "duplicate"),
        "empty name": (_pickle_edit(k["meta"], _set(names, lambda d: [b" "] + d[names][1:])), k["meta"]),
        "names not text": (_pickle_edit(k["meta"], _set(names, lambda d: list(range(n)))), "class names"),
        "names not utf-8": (_pickle_edit(k["meta"], _set(names, lambda d: [b"\xff\xfe"] + d[names][1:])), "UTF-8"),
        "not a dict": (_write(k["train"], pickle.dumps([1, 2, 3], protocol=2)), k["train"]),
        "truncated pickle": (_write(k["test"], lambda b: b[: len(b) // 2]), k["test"]),
        "empty pickle": (_write(k["meta"], b""), k["meta"]),
        "text file": (_write(k["test"], b"hello\n"), k["test"]),
        "dangling symlink": (_symlink_dangling(k["test"]), k["test"]),
        "folder in place": (_replace_by_folder(k["meta"]), k["meta"]),
    }


CIFAR_KEYS = {
    "cifar10": dict(train="data_batch_3", test="test_batch", meta="batches.meta", labels="labels", names="label_names", n=10),
    "cifar100": dict(train="train", test="test", meta="meta", labels="fine_labels", names="fine_label_names", n=100),
}


def _edit_text(name, edit):
    def apply(folder):
        path = folder / name
        path.write_bytes(edit(path.read_bytes()))
    return apply


def _append(name, line):
    return _edit_text(name, lambda b: b + line)


def _append_listed(list_name, label):
    """List a copy of the list's first image (a new file, listed once) with `label`."""
    def apply(folder):
        first = (folder / list_name).read_text().split()[0]
        shutil.copyfile(folder / first, folder / (first + ".copy.png"))
        with open(folder / list_name, "a") as f:
            f.write(f"{first}.copy.png {label}\n")
    return apply


def _first_listed(folder, list_name="train.txt"):
    return folder / (folder / list_name).read_text().split()[0]


def _listed(transform):
    """Corrupt the first image of the train list."""
    def apply(folder):
        transform(_first_listed(folder), folder)
    return apply


def _dangle(path, folder):
    path.unlink()
    path.symlink_to(folder / "no_such_file.png")


def _garbage(data):
    return lambda path, folder: path.write_bytes(data(path.read_bytes()) if callable(data) else data)


OLTR_CASES = {
    "list not utf-8": (_append("train.txt", b"train/cls_0/\xff\xfe.png 0\n"), "UTF-8"),
    "test list not utf-8": (_edit_text("test.txt", lambda b: b"\xff" + b), "UTF-8"),
    "label out of range": (_append_listed("train.txt", 3), "label 3"),
    "test label out of range": (_append_listed("test.txt", 7), "label 7"),
    "label negative": (_append_listed("train.txt", -1), "label -1"),
    "malformed line": (_append("train.txt", b"train/cls_0/train_0_1.png\n"), "expected"),
    "label beyond int64": (_append("train.txt", b"train/cls_0/x.png 99999999999999999999999\n"), "expected"),
    "empty list": (_edit_text("test.txt", lambda b: b""), "lists no images"),
    "listed twice": (_edit_text("train.txt", lambda b: b + b.splitlines(keepends=True)[0]), "twice"),
    "list is a folder": (_replace_by_folder("test.txt"), "test.txt"),
    "names duplicate": (_edit_text("classnames.txt", lambda b: b"n00000001 apple\nn00000002 bear\nn00000003 apple\n"), "duplicate"),
    "names cut off": (_edit_text("classnames.txt", lambda b: b.splitlines(keepends=True)[0] + b[:-8]), "class"),
    "names one short": (_edit_text("classnames.txt", lambda b: b"n01 apple\nn02 bear\n"), "label 2"),
    "names index gap": (_edit_text("classnames.txt", lambda b: b"apple 0\nbear 1\ncar 3\n"), "index"),
    "names not utf-8": (_edit_text("classnames.txt", lambda b: b"n01 \xe4pple\n" + b), "UTF-8"),
    "names empty": (_edit_text("classnames.txt", lambda b: b""), "class"),
    "names blank line": (_edit_text("classnames.txt", lambda b: b"n01 apple\n\t \nn03 car\n"), "label 2"),
    "listed missing": (_listed(lambda p, f: p.unlink()), "does not exist"),
    "listed dangling symlink": (_listed(_dangle), "does not exist"),
    "listed not an image": (_listed(_garbage(b"not an image")), "not a readable image"),
    "listed empty file": (_listed(_garbage(b"")), "not a readable image"),
    "listed truncated png": (_listed(_garbage(lambda b: b[: len(b) // 2])), "not a readable image"),
    "listed decompression bomb": (_listed(_garbage(bomb_png())), "pixels"),
    "listed folder": (_listed(lambda p, f: p.unlink() or p.mkdir()), "does not exist"),
}
OLTR_OK = {
    "list with CRLF": (_edit_text("train.txt", lambda b: b.replace(b"\n", b"\r\n")), [6, 4, 3]),
    "list with BOM": (_edit_text("train.txt", lambda b: b"\xef\xbb\xbf" + b), [6, 4, 3]),
    "names with CRLF": (_edit_text("classnames.txt", lambda b: b.replace(b"\n", b"\r\n")), [6, 4, 3]),
    "listed symlink to image": (_listed(lambda p, f: shutil.move(p, f / "moved.png") and p.symlink_to(f / "moved.png")),
                                [6, 4, 3]),
}


def _in_class(name, make):
    """Add `name` inside the first class folder (cls00) via make(path, folder)."""
    def apply(folder):
        path = folder / "cls00" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path, folder)
    return apply


def _made(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _png_copy(path, folder):
    shutil.copyfile(folder / "cls01" / "img_000.png", path)


FOLDER_CASES = {
    "dangling symlink image": (_in_class("gone.png", lambda p, f: p.symlink_to(f / "no_such.png")), "gone.png"),
    "not an image": (_in_class("text.png", _garbage(b"hello")), "text.png"),
    "empty image file": (_in_class("empty.jpg", _garbage(b"")), "empty.jpg"),
    "truncated png": (_in_class("cut.png", lambda p, f: p.write_bytes((f / "cls01" / "img_000.png").read_bytes()[:60])),
                      "cut.png"),
    "decompression bomb": (_in_class("bomb.png", _garbage(bomb_png())), "bomb.png"),
    "empty class folder": (lambda f: (f / "cls03").mkdir(), "cls03"),
    "only hidden images": (lambda f: _png_copy(_made(f / "cls03" / ".hidden" / "x.png"), f), "cls03"),
    "one class": (lambda f: [shutil.rmtree(f / c) for c in ("cls01", "cls02")], "class"),
    "class folder dangling": (lambda f: (f / "cls09").symlink_to(f / "no_such_dir"), "cls09"),
}
FOLDER_OK = {
    "ipynb checkpoints at root": (lambda f: _in_class("x.png", _png_copy)(f) or
                                  shutil.copytree(f / "cls00", f / ".ipynb_checkpoints"), [7, 5, 4]),
    "ipynb checkpoints in class": (_in_class(".ipynb_checkpoints/img_000-checkpoint.png", _png_copy), [6, 5, 4]),
    "hidden image": (_in_class(".img_hidden.png", _png_copy), [6, 5, 4]),
    "DS_Store": (_in_class(".DS_Store", _garbage(b"\0\0\0\1Bud1")), [6, 5, 4]),
    "text file at root": (lambda f: (f / "README.txt").write_text("about"), [6, 5, 4]),
    "text file in class": (_in_class("notes.txt", _garbage(b"notes")), [6, 5, 4]),
    "symlink to image": (_in_class("link.png", lambda p, f: p.symlink_to(f / "cls01" / "img_000.png")), [7, 5, 4]),
    "nested folder": (_in_class("sub/deeper.png", _png_copy), [7, 5, 4]),
    "upper-case suffix": (_in_class("UP.PNG", _png_copy), [7, 5, 4]),
    "symlink loop": (_in_class("loop", lambda p, f: p.symlink_to(f / "cls00")), [6, 5, 4]),
    "symlinked class folder": (lambda f: shutil.move(f / "cls02", f.parent / "elsewhere") and
                               (f / "cls02").symlink_to(f.parent / "elsewhere"), [6, 5, 4]),
}


HF_CASES = {
    "names duplicate": (_edit_text("classes.txt", lambda b: b"apple\nbear\napple\ndog\n"), "duplicate"),
    "names not utf-8": (_edit_text("classes.txt", lambda b: b"\xffapple\n" + b), "UTF-8"),
    # labels named by strings (imagefolder's metadata.csv) meet a missing name, ids (arrow) one out of range
    "names one short": (_edit_text("classes.txt", lambda b: b"apple\nbear\ncat\n"), {"hf_folder": "'dog' is not in",
                                                                                    "hf_arrow": "label 3"}),
    "names empty": (_edit_text("classes.txt", lambda b: b""), "class"),
    "names one class": (_edit_text("classes.txt", lambda b: b"apple\n"), "1 class"),
    "names file a folder": (_replace_by_folder("classes.txt"), "classes.txt"),
}

# ------------------------------------------------------------------------------------------------ the campaign
def argv_for(reader, src):
    """build_lt.py flags reading the source copy `src` with `reader`."""
    if reader.startswith("idx"):
        return ["--dataset", "fashion_mnist", "--data_dir", src, "--imb", "2", "--val_per_class", "1"]
    if reader.startswith("cifar"):
        return ["--dataset", reader, "--data_dir", src, "--imb", "2", "--val_per_class", "0"]
    if reader in ("imagenet_lt", "inat2018"):
        return ["--dataset", reader, "--data_dir", src, "--train_list", src / "train.txt", "--test_list",
                src / "test.txt", "--class_names_file", src / "classnames.txt", "--val_per_class", "0",
                *(["--relabel_by_name", "true"] if reader == "inat2018" else [])]
    if reader.startswith("hf_"):
        return ["--dataset_name", src, "--image_column_name", "image" if reader == "hf_folder" else "img",
                "--label_column_name", "fine_label", "--class_names_file", src / "classes.txt", "--imb", "2",
                "--max_per_class", "15"]
    # the folder serves as train and test source: the test split then holds every image the reader lists
    return ["--dataset", "imagefolder", "--data_dir", src, "--test_dir", src, "--imb", "1", "--val_per_class", "0"]


def source_cases():
    """(reader, clean source, case name, corruption, expected): an error substring, or the split sizes of a build."""
    ok_idx = "ok: splits: train 40 | validation 9 | test 20"  # n_max 6, imb 2: 6 5 5 4 4 4 3 3 3 3
    for reader in ("idx", "idx_gz"):
        yield reader, reader, "clean", None, ok_idx
        for name, (apply, expect) in IDX_CASES.items():
            yield reader, reader, name, apply, expect
    for reader, keys in CIFAR_KEYS.items():
        yield reader, reader, "clean", None, ("ok: splits: train 31 | validation 0 | test 20" if reader == "cifar10"
                                              else "ok: splits: train 101 | validation 0 | test 100")
        for name, (apply, expect) in cifar_corruptions(keys).items():
            yield reader, reader, name, apply, expect
    for reader in ("imagenet_lt", "inat2018"):
        yield reader, "oltr", "clean", None, "ok: splits: train 13 | validation 0 | test 6"
        for name, (apply, expect) in OLTR_CASES.items():
            yield reader, "oltr", name, apply, expect
        for name, (apply, counts) in OLTR_OK.items():
            yield reader, "oltr", name, apply, f"ok: splits: train {sum(counts)} | validation 0 | test 6"
    for reader in ("hf_folder", "hf_arrow"):  # a `datasets` source, its labels named by --class_names_file
        yield reader, reader, "clean", None, "ok: splits: train 42 | validation 74 | test 20"  # 15 11 9 7; val up to 20 unused
        for name, (apply, expect) in HF_CASES.items():
            yield reader, reader, name, apply, expect[reader] if isinstance(expect, dict) else expect
    yield "imagefolder", "folder", "clean", None, "ok: | test 15"
    for name, (apply, expect) in FOLDER_CASES.items():
        yield "imagefolder", "folder", name, apply, expect
    for name, (apply, counts) in FOLDER_OK.items():
        yield "imagefolder", "folder", name, apply, f"ok: | test {sum(counts)}"


SOURCE_CASES = list(source_cases())


def judge(result, roots, before, expect):
    """The one rule: `expect` "ok: <text>" is a success printing <text>, any other `expect` a refusal whose one
    `error:` line holds it and a fix (after "; "), with no traceback; either way every file under `roots` is as
    before."""
    if expect.startswith("ok: "):
        assert result.code == 0, result.err[-3000:]
        assert expect[4:] in result.out, result.out[-3000:]
    else:
        assert result.code != 0, f"not refused: {result.out[-1500:]}"
        line = one_error_line(result.err)
        assert expect in line and "; " in line, line
    assert tree_digest(*roots) == before, "files changed"


@pytest.mark.parametrize("reader, fmt, name, apply, expect", SOURCE_CASES,
                         ids=[f"{r}-{n}" for r, _, n, _, _ in SOURCE_CASES])
def test_corrupted_source(clean, tmp_path, reader, fmt, name, apply, expect):
    src = tmp_path / "src"
    shutil.copytree(clean / fmt, src, symlinks=True)
    if apply is not None:
        apply(src)
    before = tree_digest(src)
    result = run_cli(BUILD, *argv_for(reader, src), "--cache_dir", tmp_path / "cache")
    judge(result, [src], before, expect)


# ------------------------------------------------------------------------------------------------ contradictions
TRAIN = "train_lt.py"
# a flag that contradicts what a saved split records (it was built with imb 2, n_max 6, seed 0, rng, val 1 per class),
# or that names a source the saved split does not read; build_lt.py calls the seed --seed, train_lt.py --imb_seed
SAVED_CONTRADICTIONS = [
    ("imb", "50"), ("max_per_class", "3"), ("seed", "4"), ("selection", "lift"), ("val_per_class", "2"),
    ("val_source", "test_slice"), ("many_threshold", "50"), ("few_threshold", "5"), ("data_dir", "{idx}"),
    ("relabel_by_name", "true"), ("class_names_file", "{names}"), ("train_list", "{names}"), ("test_dir", "{folder}"),
    ("val_dir", "{folder}"),
]
SAVED_AGREEING = [("imb", "2"), ("max_per_class", "6"), ("val_per_class", "1"), ("seed", "0"), ("selection", "rng")]


def train_argv(dataset, out, *extra):
    """train_lt.py flags of a tiny run; the refusals under test come before any training."""
    return [TRAIN, "--dataset", dataset, "--model_name_or_path", TINY_VIT, "--from_scratch", "true", "--head_init",
            "random", "--method", "full_all", "--num_workers", "0", "--max_train_steps", "1", "--output_dir", out,
            *extra]


def contradiction_cases():
    """(argv template, expected): {saved}, {idx}, {idx60}, {names}, {folder}, {out}, {preset} are filled per case."""
    for cli in ("build", "train"):
        for flag, value in SAVED_CONTRADICTIONS:
            name = "imb_seed" if (cli, flag) == ("train", "seed") else flag
            extra = [f"--{name}", value]
            argv = train_argv("{saved}", "{out}", *extra) if cli == "train" else \
                [BUILD, "--dataset", "{saved}", *extra]
            yield f"saved-{cli}-{flag}", argv, "contradicts the saved split"
    for flag, value in SAVED_AGREEING:
        yield f"saved-build-agrees-{flag}", [BUILD, "--dataset", "{saved}", f"--{flag}", value], \
            "ok: splits: train 40 | validation 9 | test 20"
    # named builder configs (imb100 / imb50 / imb10 fix the ratio, quickstart also n_max 600) against --imb /
    # --max_per_class; on 60 images per class imb10 and imb50 build, imb100 leaves a class empty
    fixed = {"imb100": 100, "imb50": 50, "imb10": 10, "quickstart": 100}
    # imb50: 60 38 25 16 10 6 4 2 1 1 train images, up to 20 unused per class for val
    built = {"imb50": "ok: splits: train 163 | validation 180 | test 20", "imb10": "ok: splits: train 240 | validation 174 | test 20"}
    for config, ratio in fixed.items():
        # not --imb 100: a flag at its default value cannot be told from an absent one, so it yields to the config
        for imb in (2, 10, 50):
            expect = "was also passed" if imb != ratio else built[config]
            for cli in ("build", "train"):
                if cli == "train" and imb == ratio:
                    continue  # the same build as build_lt.py's, then a training run
                argv = [BUILD, "--dataset", "fashion_mnist", "--data_dir", "{idx60}"] if cli == "build" else \
                    train_argv("fashion_mnist", "{out}", "--data_dir", "{idx60}")
                yield f"named-{cli}-{config}-imb{imb}", [*argv, "--dataset_config_name", config, "--imb", str(imb)], \
                    expect
        if config == "quickstart":
            for cli in ("build", "train"):
                argv = [BUILD, "--dataset", "fashion_mnist", "--data_dir", "{idx60}"] if cli == "build" else \
                    train_argv("fashion_mnist", "{out}", "--data_dir", "{idx60}")
                yield f"named-{cli}-quickstart-max3", [*argv, "--dataset_config_name", config, "--max_per_class",
                                                       "3"], "was also passed"
    # presets: a key set twice is refused whatever the values, and whatever the command line adds
    for key, first, second in [("imb", 10, 50), ("imb", 10, 10), ("learning_rate", 0.1, 0.2), ("method", "full_all",
                               "lora"), ("max_train_steps", 1, 2), ("dataset", "a", "b"), ("seed", 1, 1),
                               ("hub_token", "x", "y")]:
        yield f"preset-dup-{key}-{first}-{second}", [TRAIN, "--config", f"{{preset}}:{key}: {first}\n{key}: {second}\n",
                                                     "--output_dir", "{out}"], f"sets '{key}'"
    yield "preset-dup-with-flag", [TRAIN, "--config", "{preset}:seed: 1\nseed: 2\n", "--seed", "3", "--output_dir",
                                   "{out}"], "sets 'seed'"
    yield "preset-dup-nested", [TRAIN, "--config", "{preset}:imb: 2\nmethod: full_all\nimb: 2.0\n", "--output_dir",
                                "{out}"], "sets 'imb'"


CONTRADICTION_CASES = list(contradiction_cases())


@pytest.mark.parametrize("name, argv, expect", CONTRADICTION_CASES, ids=[c[0] for c in CONTRADICTION_CASES])
def test_contradiction(clean, tmp_path, name, argv, expect):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    names = inputs / "names.txt"
    names.write_text("a\nb\n")
    filled = []
    for arg in argv[1:]:
        arg = str(arg)
        if arg.startswith("{preset}:"):
            (inputs / "preset.yaml").write_text(arg.split(":", 1)[1])
            arg = str(inputs / "preset.yaml")
        filled.append(arg.format(saved=clean / "saved", idx=clean / "idx", idx60=clean / "idx60", names=names,
                                 folder=clean / "folder", out=tmp_path / "out"))
    roots = [clean / "saved", clean / "idx", clean / "idx60", inputs]
    before = tree_digest(*roots)
    result = run_cli(argv[0], *filled, "--cache_dir", tmp_path / "cache")
    judge(result, roots, before, expect)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ records, numerics
TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


@pytest.fixture(scope="module")
def exports(vit_dir, tmp_path_factory):
    """Soup ingredients and a predict image: a and b record one val split, c another; big/neg hold float32-extreme
    heads (their weighted merge leaves float32); nan/inf hold a non-finite head; scale_* record a bad head scale."""
    import torch
    from safetensors.torch import load_file, save_file

    from helpers_soup import tiny_info, tiny_lt_model, write_ingredient
    from lt_utils.head_init import random_head_init

    root = tmp_path_factory.mktemp("exports")
    lt = tiny_lt_model(vit_dir, 4)
    head_init = random_head_init(4, lt.spec.hidden_size, seed=7)
    head = lt.state_dict()["head.weight"]
    heads = {"a": head + 0.1, "b": head - 0.1, "c": head, "big": torch.full_like(head, 3e38),
             "neg": torch.full_like(head, -3e38), "nan": head, "inf": head}
    for name, weight in heads.items():
        info = tiny_info()
        info.index_hashes = {"validation": "other" if name == "c" else "same"}
        write_ingredient(root / name, lt, vit_dir, {"head.weight": weight}, head_init, info=info)
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):  # the exporter never writes these: edited
        tensors = load_file(root / name / "model.safetensors")
        key = next(k for k in tensors if k.endswith("head.weight"))
        tensors[key][0, 0] = value
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
    for name, value in (("0", 0), ("nan", float("nan")), ("neg", -25.0), ("text", "x"), ("inf", float("inf"))):
        shutil.copytree(root / "a", root / f"scale_{name}")
        config = json.loads((root / "a" / "config.json").read_text())
        (root / f"scale_{name}" / "config.json").write_text(json.dumps({**config, "head_scale": value}))
    write_image_folder(root / "images", [2])
    return root


def record_cases():
    """(name, argv template with {x} = the exports folder / {out} = a new output, expected)."""
    for cli, argv in (("train", [TRAIN, "--output_dir", "{out}"]), ("build", [BUILD]),
                      ("eval", ["eval_lt.py", "{x}/a"]), ("soup", ["soup.py", "{x}/a", "{x}/b"]),
                      ("predict", ["predict.py", "{x}/a", "{x}/images"])):
        for form, extra in (("flag", ["--hub-token", TOKEN]), ("flag=", [f"--hub-token={TOKEN}"]),
                            ("positional", [TOKEN]), ("typo", ["--hub_tokn", TOKEN])):
            yield f"token-{cli}-{form}", [*argv, *extra], "hf_<hidden>"
    soup = ["soup.py", "{x}/a", "{x}/b", "--output_dir", "{out}"]
    for weights, extra, expect in (
            (["1e308", "1e308"], [], "float range"), (["1e308", "1e308"], ["--normalize"], "float range"),
            (["1.7e308", "1e308"], [], "float range"), (["nan", "1"], [], "not finite"),
            (["inf", "0"], [], "not finite"), (["1e-320", "1e-320"], ["--normalize"], "ok: weights 0.5, 0.5"),
            (["0.25", "0.75"], [], "ok: weights 0.25, 0.75"), (["1", "1"], [], "not 1"), (["0", "0"], ["--normalize"],
                                                                                    "positive sum")):
        yield f"soup-weights-{'_'.join(weights)}{''.join(extra)}", [*soup, "--weights", *weights, *extra], expect
    for flag, value in (("lam", "nan"), ("lam", "0"), ("alpha", "nan"), ("alpha", "1.5"), ("lam", "1e400")):
        yield f"soup-{flag}-{value}", [*soup, "--mode", "progressive", f"--{flag}", value], f"--{flag}"
    yield "soup-merged-overflow", ["soup.py", "{x}/big", "{x}/neg", "--output_dir", "{out}", "--weights", "1.5",
                                   "-0.5", "--merge_method", "task_arithmetic"], "non-finite"
    yield "soup-greedy-other-val-data", ["soup.py", "{x}/a", "{x}/c", "--mode", "greedy", "--output_dir", "{out}"], \
        "other validation data"
    for bad in ("nan", "inf", "scale_0", "scale_nan", "scale_neg", "scale_text", "scale_inf"):
        yield f"soup-export-{bad}", ["soup.py", "{x}/a", f"{{x}}/{bad}", "--output_dir", "{out}"], bad.split("_")[0]
        yield f"predict-export-{bad}", ["predict.py", f"{{x}}/{bad}", "{x}/images", "--output", "{out}.csv"], \
            bad.split("_")[0]


RECORD_CASES = list(record_cases())


@pytest.mark.parametrize("name, argv, expect", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_records_and_numerics(exports, tmp_path, name, argv, expect):
    filled = [str(a).format(x=exports, out=tmp_path / "out") for a in argv[1:]]
    before = tree_digest(exports)
    result = run_cli(argv[0], *filled)
    judge(result, [exports], before, expect)
    assert TOKEN not in result.err + result.out


# ------------------------------------------------------------------------------------------------ identity by content
def _rewrite_keeping_stat(path, data):
    """Replace the bytes of `path` with `data` of the same size and put its modification time back (`cp -p`)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_byte(name, offset):
    def apply(folder):
        path = next(folder.rglob(name))
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        _rewrite_keeping_stat(path, bytes(data))
    return apply


def _flip_cifar_pixel(name):
    """One pixel's lowest bit flipped, pickled again: the same size (the value keeps its high bit)."""
    def apply(folder):
        path = next(folder.rglob(name))
        d = pickle.loads(path.read_bytes(), encoding="bytes")
        d[b"data"][0, 0] ^= 1
        _rewrite_keeping_stat(path, pickle.dumps(d, protocol=2))
    return apply


def _copy_over(target, source):
    def apply(folder):
        _rewrite_keeping_stat(folder / target, (folder / source).read_bytes())
    return apply


STALE_CASES = {
    "idx": _flip_byte("train-images-idx3-ubyte", 16 + 5),
    "cifar10": _flip_cifar_pixel("data_batch_1"),
    "imagenet_lt": _copy_over("train/cls_0/train_0_0.png", "train/cls_1/train_1_0.png"),
    "imagefolder": _copy_over("cls00/img_000.png", "cls01/img_000.png"),
}


@pytest.mark.parametrize("reader", list(STALE_CASES))
def test_rewritten_source_is_not_served_from_the_cache(clean, tmp_path, reader):
    """A same-size rewrite with the old modification time (cp -p) is another source: built again, not reused."""
    from datasets import load_from_disk

    src = tmp_path / "src"
    shutil.copytree(clean / ("oltr" if reader == "imagenet_lt" else "folder" if reader == "imagefolder" else reader), src)

    def build(out, cache):
        result = run_cli(BUILD, *argv_for(reader, src), "--cache_dir", cache, "--output_dir", out)
        assert result.code == 0, result.err[-2000:]
        return split_digest(load_from_disk(str(out)))

    first = build(tmp_path / "a", tmp_path / "cache")
    STALE_CASES[reader](src)
    again = build(tmp_path / "b", tmp_path / "cache")
    assert again != first
    assert again == build(tmp_path / "c", tmp_path / "fresh_cache")
    # the split hash (what a resume and eval_lt.py compare) follows the images, not only their positions
    hashes = [json.loads((tmp_path / run / "lt_info.json").read_text())["index_hashes"] for run in "abc"]
    assert hashes[0]["train"] != hashes[1]["train"] == hashes[2]["train"]


# ------------------------------------------------------------------------------------------------ records
def test_predict_reads_16_bit_images_as_eval_does(exports, tmp_path):
    """A 16-bit grayscale ramp predicts exactly as its 8-bit scaling (PIL's convert clipped it to white)."""
    import PIL.Image

    ramp16 = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    PIL.Image.fromarray(ramp16).save(tmp_path / "deep.png")
    PIL.Image.fromarray((ramp16 // 257).astype(np.uint8)).save(tmp_path / "flat.png")
    assert PIL.Image.open(tmp_path / "deep.png").mode.startswith("I")
    rows = {}
    for name in ("deep", "flat", "white"):
        if name == "white":
            PIL.Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "white.png")
        result = run_cli("predict.py", exports / "a", tmp_path / f"{name}.png", "--output", tmp_path / f"{name}.csv")
        assert result.code == 0, result.err[-2000:]
        rows[name] = (tmp_path / f"{name}.csv").read_text().splitlines()[1].split(",")[1:]
    assert rows["deep"] == rows["flat"] != rows["white"]


def test_exports_record_local_paths_absolute(idx_dir, tmp_path):
    """Typed relative, the base model and the data are recorded absolute: from another folder they are the same."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "vit").symlink_to(TINY_VIT)
    (work / "data").symlink_to(idx_dir)
    result = run_cli(TRAIN, "--dataset", "fashion_mnist", "--data_dir", "data", "--imb", "10", "--max_per_class", "20",
                     "--model_name_or_path", "vit", "--from_scratch", "true", "--head_init", "random", "--method",
                     "full_all", "--num_workers", "0", "--max_train_steps", "1", "--per_device_train_batch_size", "8",
                     "--output_dir", "run", "--cache_dir", tmp_path / "cache", cwd=work)
    assert result.code == 0, result.err[-2000:]
    config = json.loads((work / "run" / "final" / "config.json").read_text())
    assert config["base_model"] == str(work / "vit")
    assert config["run"]["data_dir"] == str(idx_dir.resolve())


RECORD_DAMAGE = {
    "imb nan": ("imb", float("nan")), "imb inf": ("imb", float("inf")), "imb 0.5": ("imb", 0.5),
    "counts short": ("train_counts", lambda v: v[:-1]), "count negative": ("train_counts", lambda v: [-1] + v[1:]),
    "group unknown": ("groups", lambda v: ["huge"] + v[1:]), "threshold text": ("many_threshold", "x"),
    "max_per_class -1": ("max_per_class", -1),
}
DAMAGED = [(where, cli, damage) for where, clis in (("saved", ("build", "train")), ("export", ("soup", "predict")))
           for cli in clis for damage in RECORD_DAMAGE]


@pytest.mark.parametrize("where, cli, damage", DAMAGED, ids=[f"{w}-{c}-{d}" for w, c, d in DAMAGED])
def test_damaged_numeric_record(clean, exports, tmp_path, where, cli, damage):
    """A split record (a saved split's lt_info.json, an export's config.json lt_info) whose numbers are not usable."""
    key, value = RECORD_DAMAGE[damage]
    target = tmp_path / where
    shutil.copytree(clean / "saved" if where == "saved" else exports / "a", target)
    path = target / ("lt_info.json" if where == "saved" else "config.json")
    record = json.loads(path.read_text())
    info = record if where == "saved" else record["lt_info"]
    info[key] = value(info[key]) if callable(value) else value
    path.write_text(json.dumps(record))
    argv = {"build": [BUILD, "--dataset", target], "train": train_argv(target, tmp_path / "out"),
            "soup": ["soup.py", exports / "b", target, "--output_dir", tmp_path / "out"],
            "predict": ["predict.py", target, exports / "images", "--output", tmp_path / "out.csv"]}[cli]
    before = tree_digest(target)
    result = run_cli(argv[0], *argv[1:], "--cache_dir", tmp_path / "cache") if cli in ("build", "train") else \
        run_cli(argv[0], *argv[1:])
    # an export's counts are first checked against its labels, in the export layer's own words
    judge(result, [target], before, "per-class train counts" if (where, damage) == ("export", "counts short")
          else "is damaged")
