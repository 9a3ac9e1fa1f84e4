"""Per-image predictions: predict.py (an export or Hub id on image files, with transformers alone) and
eval_lt.py --save_predictions (the images of an evaluated split)."""
import csv
import io
from pathlib import Path

from .errors import UserError, first_line, require
from .fileio import atomic_write_text
from .paths import check_output, check_outputs_apart

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def collect_images(inputs):
    """Image files named by `inputs` (files, or folders searched recursively, each sorted), in order; duplicates once."""
    found = []
    for item in inputs:
        path = Path(item)
        require(path.exists(), f"{item} does not exist; pass image files or folders of images")
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            require(path.suffix.lower() in IMAGE_SUFFIXES,
                    f"{item} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); pass images or folders")
            found.append(path)
    require(found, f"no image files in {' '.join(map(str, inputs))}; pass images or folders of images")
    return list(dict.fromkeys(found))


def check_flags(output, model, inputs, overwrite, top_k, batch_size):
    """Before anything loads: --output given, a .csv not existing (unless --overwrite), apart from the model dir (and
    the folders it records) and every image or folder in `inputs`, where it can be created; --top_k and --batch_size at least 1 (the flag table
    checks them on the command line)."""
    require(output is not None, "--output is required; pass the CSV to write, e.g. --output predictions.csv")
    require(top_k >= 1, f"--top_k must be >= 1, got {top_k}; pass 1 or more")
    require(batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}; pass 1 or more")
    output = Path(output)
    require(output.suffix.lower() == ".csv", f"--output {output} must be a .csv file; pass e.g. --output predictions.csv")
    from .checkpoint import recorded_inputs

    check_outputs_apart({"--output": output}, {"the model": model, **recorded_inputs(model, "the model"),
                                               **{f"image {i + 1}": p for i, p in enumerate(inputs)}})
    check_output(output, "--output", folder=False)
    require(overwrite or not output.exists(), f"{output} already exists; pass --overwrite or another --output")


def load_classifier(model_id):
    """(image processor, model in eval mode) of an export dir or Hub id, through transformers' auto classes. An
    lt-hf export's record and weight files are checked first (complete, finite): transformers would load NaN
    weights, and report a truncated file in many lines."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .checkpoint import is_project_export, read_export_config, read_tensors, resolve_export_dir, weight_files

    local = resolve_export_dir(model_id) if Path(str(model_id)).exists() else None
    if local is not None and is_project_export(local):
        read_export_config(local)
        for path in weight_files(local):
            read_tensors(path)
    try:
        processor = AutoImageProcessor.from_pretrained(str(model_id))
        model, info = AutoModelForImageClassification.from_pretrained(str(model_id), trust_remote_code=True,
                                                                      output_loading_info=True)
    except Exception as err:  # transformers' errors for a folder or repo that holds no loadable classifier
        raise UserError(f"cannot load an image classifier from {model_id} ({first_line(err)}); "
                        "pass an export dir (final/, best/, a soup) or a Hub model id") from None
    # transformers fills weights its files lack with a random init (a warning): such predictions mean nothing
    missing = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    require(not missing, f"cannot load an image classifier from {model_id}: its files lack {len(missing)} of the "
                         f"model's weights (e.g. {missing[0] if missing else ''}); pass a complete export or Hub model")
    return processor, model.eval()


def predict_images(processor, model, paths, batch_size=32, top_k=5, progress=True):
    """Rows (path, label, score, top-k labels, top-k scores) for each image, in the order of `paths`."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    from .transforms import to_rgb_image

    id2label = model.config.id2label
    k = min(top_k, len(id2label))
    rows = []
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            images = []
            for path in batch:
                try:
                    with Image.open(path) as image:
                        images.append(to_rgb_image(image))
                except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
                    raise UserError(f"cannot read image {path} ({err.__class__.__name__}); remove it or fix it") from None
            with torch.no_grad():
                logits = model(**processor(images, return_tensors="pt")).logits.float()
            probs, classes = logits.softmax(dim=-1).topk(k, dim=-1)
            for path, p, c in zip(batch, probs.tolist(), classes.tolist()):
                names = [id2label[i] for i in c]
                rows.append([str(path), names[0], f"{p[0]:.6f}", "|".join(names), "|".join(f"{v:.6f}" for v in p)])
            bar.update(len(batch))
    return rows


PREDICT_HEADER = ["path", "label", "score", "top_k_labels", "top_k_scores"]


def write_csv(path, header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_eval_predictions(path, predictions, class_names):
    """predictions.csv of eval_lt.py --save_predictions: one row per image of the split, in dataset order."""
    labels, probs, classes = predictions["labels"].tolist(), predictions["top_probs"].tolist(), predictions["top_classes"].tolist()
    rows = []
    for index, (label, p, c) in enumerate(zip(labels, probs, classes)):
        rows.append([index, class_names[label], class_names[c[0]], f"{p[0]:.6f}", int(c[0] == label),
                     "|".join(class_names[i] for i in c), "|".join(f"{v:.6f}" for v in p)])
    write_csv(path, ["index", "label", "prediction", "score", "correct", "top_k_labels", "top_k_scores"], rows)
