"""Writers for tiny datasets in the real on-disk formats (CIFAR pickles, IDX, image files + OLTR lists)."""
import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import PIL.Image

REPO = Path(__file__).resolve().parents[1]


def _images(rng, n, shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def index_images(start, n):
    """CIFAR rows (3072 = R, G, B planes) whose pixels spell their own source index: R, G, B = its three bytes."""
    index = np.arange(start, start + n)
    planes = [np.repeat(((index >> shift) & 255)[:, None], 1024, axis=1) for shift in (16, 8, 0)]
    return np.concatenate(planes, axis=1).astype(np.uint8)


def decode_index(image):
    """The source index an `index_images` image spells (a PIL image or an HWC array)."""
    r, g, b = (int(v) for v in np.asarray(image)[0, 0, :3])
    return (r << 16) | (g << 8) | b


def _interleaved_labels(rng, num_classes, per_class):
    """Labels of a source split in a shuffled (CIFAR-like) order, `per_class` of each class."""
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def write_cifar100(root, per_class_train=12, per_class_test=3, seed=0, index_pixels=False):
    """`root/cifar-100-python/{train,test,meta}` as in the original archive (protocol-2 pickles, bytes keys).
    index_pixels: every image spells its index in its split (`decode_index`), else random pixels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = _interleaved_labels(rng, 100, per_class)
        data = index_images(0, len(labels)) if index_pixels else _images(rng, len(labels), (3072,))
        d = {b"filenames": [f"{i}.png".encode() for i in range(len(labels))], b"batch_label": split.encode(),
             b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": data}
        (folder / split).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return Path(root)


def write_cifar10(root, per_class_train=30, per_class_test=4, seed=0, index_pixels=False):
    """`root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`; train spread over 5 batches.
    index_pixels: every image spells its index in its split (train: across the 5 batches in order)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = _interleaved_labels(rng, 10, per_class_train)
    batches = {f"data_batch_{i + 1}": part for i, part in enumerate(np.array_split(train, 5))}
    batches["test_batch"] = _interleaved_labels(rng, 10, per_class_test)
    start = 0
    for name, labels in batches.items():
        start = 0 if name == "test_batch" else start
        data = index_images(start, len(labels)) if index_pixels else _images(rng, len(labels), (3072,))
        start += len(labels)
        d = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
             b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"label_names": [f"c10_{i}".encode() for i in range(10)], b"num_cases_per_batch": 10, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return Path(root)


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx_dir(root, per_class_train=40, per_class_test=5, gz=True, seed=0):
    """The four Fashion-MNIST IDX files (28x28 uint8), gzipped like Debian's or raw."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = _interleaved_labels(rng, 10, per_class)
        for kind, arr in (("images-idx3", _images(rng, len(labels), (28, 28))), ("labels-idx1", labels)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(raw, mtime=0))
            else:
                (root / name).write_bytes(raw)
    return root


def write_png(path, rng, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(_images(rng, 1, (size, size, 3))[0]).save(path, format="PNG")


def write_image_folder(root, per_class, seed=0):
    """`root/<class>/img_XXX.png`; `per_class` is a list of image counts, one per class."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c, n in enumerate(per_class):
        for k in range(n):
            write_png(root / f"cls{c:02d}" / f"img_{k:03d}.png", rng)
    return root


def write_oltr(root, per_class, seed=0, prefix="train"):
    """Images under `root/<prefix>/cls_c/` and the list `root/<prefix>.txt` ('relative/path label' lines)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    lines = []
    for c, n in enumerate(per_class):
        for k in range(n):
            rel = f"{prefix}/cls_{c}/{prefix}_{c}_{k}.png"
            write_png(root / rel, rng)
            lines.append(f"{rel} {c}")
    lines = [lines[i] for i in rng.permutation(len(lines))]  # lists are not sorted by class
    list_path = root / f"{prefix}.txt"
    list_path.write_text("\n".join(lines) + "\n")
    return list_path


def split_digest(ds):
    """sha256 over every split's labels and image bytes, in order."""
    h = hashlib.sha256()
    for name in ds:
        split = ds[name].cast_column("image", type(ds[name].features["image"])(decode=False))
        for row in split:
            h.update(f"{name}|{row['label']}|".encode() + row["image"]["bytes"])
    return h.hexdigest()


def decoded_hashes(split):
    """Hashes of the decoded pixels of each row: identity of an image independent of its encoding."""
    out = []
    for row in split:
        arr = np.asarray(row["image"])
        out.append(hashlib.sha1(arr.tobytes()).hexdigest())
    return out

