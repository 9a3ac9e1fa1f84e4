"""Model cards and Hub uploads of export dirs."""
import fnmatch
import re
from pathlib import Path

from .errors import UserError, first_line


# LT builders -> the Hub dataset their images come from (the model card's `datasets`)
SOURCE_DATASETS = {"cifar100_lt": "uoft-cs/cifar100", "cifar10_lt": "uoft-cs/cifar10",
                   "fashion_mnist_lt": "zalando-datasets/fashion_mnist"}
# model-index rows: (metrics.json key, metric type, name)
CARD_METRICS = (("accuracy", "accuracy", "top-1 accuracy"), ("mean_class_acc", "mean_class_accuracy", "mean-class accuracy"),
                ("many_acc", "many_shot_accuracy", "many-shot accuracy"),
                ("medium_acc", "medium_shot_accuracy", "medium-shot accuracy"),
                ("few_acc", "few_shot_accuracy", "few-shot accuracy"))


def _pct(value):
    return "—" if value is None else f"{value:.2f}"


def _imbalance(dataset):
    """The split's ratio; a recorded null is --imb none: the source's own class counts."""
    if "imb" in dataset and dataset["imb"] is None:
        return "the source's own class counts"
    return f"imbalance ratio {dataset.get('imb')}"


def hub_id(name):
    """`name` if it reads as a Hub id (user/repo, not an existing local path), else None."""
    from .models import _is_local_path

    name = str(name)
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not _is_local_path(name) else None


def base_license(base_model):
    """The base model's license from its model card (a local folder's README.md, or the Hub's), None when unknown."""
    from huggingface_hub import ModelCard

    from .hub_access import cache_if_unreachable

    folder = Path(str(base_model)).expanduser()
    if folder.exists() and not (folder / "README.md").is_file():  # a local folder without a card: no Hub lookup
        return None
    try:
        with cache_if_unreachable(base_model):  # the Hub out of reach: the cache, at once (no retries)
            card = ModelCard.load(folder / "README.md") if folder.exists() else ModelCard.load(str(base_model))
    except Exception:  # offline, no card, not a repo: unknown
        return None
    return card.data.to_dict().get("license")


def card_data(meta, metrics):
    """ModelCardData: model-index (top-1, mean-class, many / medium / few on the dataset split), base model, datasets,
    license, and a note for what could not be given as a Hub id."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = meta.get("dataset") or {}
    builder = str(dataset.get("dataset"))
    source = SOURCE_DATASETS.get(builder) or hub_id(builder)
    name = f"{Path(builder).name} (imbalance ratio {dataset.get('imb')})" if dataset.get("imb") else Path(builder).name
    results = []
    for split in ("test", "validation"):
        m = metrics.get(split) if isinstance(metrics, dict) else None
        if not (isinstance(m, dict) and "accuracy" in m):
            continue
        results += [EvalResult(task_type="image-classification", task_name="Long-tailed image classification",
                               dataset_type=source or Path(builder).name, dataset_name=name, dataset_split=split,
                               metric_type=metric_type, metric_name=metric_name, metric_value=round(float(m[key]), 4))
                    for key, metric_type, metric_name in CARD_METRICS if m.get(key) is not None]
    base = None if meta["from_scratch"] else hub_id(meta["base_model"])
    data = ModelCardData(
        model_name=meta.get("run_name", "long-tail classifier"), library_name="transformers",
        pipeline_tag="image-classification", tags=["long-tail", "image-classification", "lt-hf", meta["method"]],
        base_model=base, datasets=[source] if source else None,
        license=base_license(meta["base_model"]) if base or not meta["from_scratch"] else None,
        eval_results=results or None)
    return data


def model_card(meta, metrics):
    """README.md of an export: huggingface_hub metadata (model-index ...), results, and how to load it."""
    from huggingface_hub import ModelCard

    data = card_data(meta, metrics)
    groups = meta.get("group_counts", {})
    base_note = ""
    if meta["from_scratch"]:
        base_note = f"Trained from scratch (architecture of `{meta['base_model']}`)."
    elif data.base_model is None:
        base_note = (f"Base model: the local folder `{meta['base_model']}` (not a Hub id, so `base_model` is not set "
                     "in the metadata).")
    else:
        base_note = f"Base model: [`{data.base_model}`](https://huggingface.co/{data.base_model})."
    lines = [
        f"# {meta.get('run_name', 'Long-tail classifier')}", "",
        f"{base_note} Method `{meta['method']}`, {meta['head']['type']} head ({meta['head']['init']} init), "
        f"{meta['num_labels']} classes, dataset `{(meta.get('dataset') or {}).get('dataset')}` "
        f"({_imbalance(meta.get('dataset') or {})}). Trained with lt-hf.", "",
        "| split | overall | mean-class | many | medium | few |", "|---|---|---|---|---|---|"]
    for split, m in metrics.items():
        if isinstance(m, dict) and "accuracy" in m:
            lines.append(f"| {split} | {_pct(m['accuracy'])} | {_pct(m['mean_class_acc'])} | {_pct(m['many_acc'])} | "
                         f"{_pct(m['medium_acc'])} | {_pct(m['few_acc'])} |")
    lines += [
        "", f"Groups by training count: many > {meta['many_threshold']} ({groups.get('many', '?')} classes), "
        f"medium {meta['few_threshold']}–{meta['many_threshold']} ({groups.get('medium', '?')}), "
        f"few < {meta['few_threshold']} ({groups.get('few', '?')}). Accuracies in %; an empty group is shown as —.", "",
        "## Use (transformers alone)", "", "```python", model_snippet(meta.get("hub_model_id") or "your-name/your-model"), "```", ""]
    if meta.get("adapter"):
        lines += ["## The LoRA adapter (peft)", "",
                  "The repo also holds a standard peft adapter of the base backbone (`adapter/`) and the classifier head "
                  f"(`adapter/head.safetensors`, a {meta['head']['type']} head on the backbone's "
                  f"{_SNIPPET_FEATURES[_feature_name(meta['backbone']['kind'])][1]} feature):", "",
                  "```python", adapter_snippet(meta.get("hub_model_id") or "your-name/your-model", meta['base_model'], meta['head']['type'],
                                               meta['backbone']['kind']), "```", ""]
    content = "---\n" + data.to_yaml() + "\n---\n" + "\n".join(lines)
    return str(ModelCard(content))


def model_snippet(repo_id):
    """The loading snippet of a pushed model (README's Hub section and every model card; the tests run it)."""
    return f"""from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
from PIL import Image

classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
print(classifier(Image.open("image.png"), top_k=3))          # [{{"label": ..., "score": ...}}, ...]

# or the model itself: the logits of eval_lt.py
processor = AutoImageProcessor.from_pretrained("{repo_id}")
model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True).eval()
logits = model(**processor(Image.open("image.png"), return_tensors="pt")).logits
print(model.config.id2label[int(logits.argmax(-1))])"""


# a modeling_lt.FEATURES name -> (how the snippet computes it from AutoModel(base), what the model card calls it)
_SNIPPET_FEATURES = {
    "pooler_output": ("getattr(base, 'vision_model', base)(**inputs).pooler_output  # CLIP's pooled CLS, before the "
                      "projection", "pooled CLS"),
    "pooler_or_token_mean": ("getattr(base, 'vision_model', base)(**inputs).pooler_output  # the attention-pooled "
                             "embedding", "attention-pooled"),
    "cls_token": ("base(**inputs).last_hidden_state[:, 0]  # the CLS token", "CLS"),
    "cls_patch_mean": ("(lambda h: torch.cat([h[:, 0], h[:, 1:].mean(1)], -1))(base(**inputs).last_hidden_state)"
                       "  # [CLS, patch mean]", "[CLS, patch-mean]"),
}


def _feature_name(kind):
    from .models import BACKBONES

    return BACKBONES.get(kind).features


def adapter_snippet(repo_id, base_model, head_type="cosine", kind="clip"):
    """The loading snippet of a pushed LoRA adapter: peft on the plain base model, then the saved head."""
    feature = _SNIPPET_FEATURES[_feature_name(kind)][0]
    logit = ("float(meta['scale']) * F.normalize(feature, dim=-1) @ F.normalize(head['weight'], dim=-1).T"
             if head_type == "cosine" else "F.linear(feature, head['weight'], head.get('bias'))")
    return f"""import os
{"import torch" + chr(10) if "torch." in feature else ""}import torch.nn.functional as F
from huggingface_hub import snapshot_download
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModel

repo = "{repo_id}"
local = repo if os.path.isdir(repo) else snapshot_download(repo)   # a Hub id or a local folder
base = PeftModel.from_pretrained(AutoModel.from_pretrained("{base_model}"), local, subfolder="adapter")
base = base.merge_and_unload().eval()
with safe_open(os.path.join(local, "adapter", "head.safetensors"), "pt") as f:   # the trained {head_type} head
    head, meta = {{k: f.get_tensor(k) for k in f.keys()}}, f.metadata()
inputs = AutoImageProcessor.from_pretrained(local)(Image.open("image.png"), return_tensors="pt")
feature = {feature}
logits = {logit}"""


def push_repo_id(hub_model_id, output_dir):
    """The repo --push_to_hub pushes to: --hub_model_id, else the output folder's name (under the token's user)."""
    return hub_model_id or Path(output_dir).name


def check_hub_push(repo_id, token=None, repo_type="model", flag="--hub_model_id"):
    """What a push at the end needs, checked before any compute: a valid repo id, the Hub reachable (at once, no
    retries), a token, and the repo itself, created now as transformers' examples do, so a name owned by someone else
    or a read-only token is said before training. Returns the repo's full id (user/name)."""
    from huggingface_hub import create_repo, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .hub_access import hub_unreachable

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{flag} {repo_id}: not a Hub repo id ({err}); pass NAME or USER/NAME (letters, digits, "
                        "-, _ and .)") from None
    if (why := hub_unreachable()) is not None:
        raise UserError(f"--push_to_hub needs the Hub, which cannot be reached ({why}); run again with the Hub "
                        "reachable, or drop --push_to_hub")
    token = token or get_token()
    if not token:
        raise UserError("--push_to_hub needs a Hub token with write access; set HF_TOKEN (or run `hf auth login`)")
    try:
        return create_repo(repo_id, token=token, exist_ok=True, repo_type=repo_type).repo_id
    except Exception as err:  # a name of another user, a read-only or invalid token, the network: for the user
        raise UserError(f"--push_to_hub: creating the Hub repo {repo_id} failed ({err.__class__.__name__}: "
                        f"{first_line(err)}); check that HF_TOKEN may write there and the repo id") from None


def push_export(export_dir, repo_id, token=None, what="model", commit_message="Upload long-tail classifier"):
    """Upload the export dir to the repo check_hub_push created: the transformers model, its code and card (and a
    LoRA run's peft adapter in adapter/); with what="adapter", that plain peft adapter alone, at the repo's root.
    Returns the commit's URL."""
    from huggingface_hub import upload_folder

    folder = Path(export_dir) / ("adapter" if what == "adapter" else "")
    try:
        commit = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                               token=token, ignore_patterns=list(NOT_PUSHED))
    except Exception as err:  # network, auth, name: the user can fix all of these
        raise UserError(f"pushing {folder} to the Hub as {repo_id} failed ({err.__class__.__name__}: {first_line(err)}); "
                        "check HF_TOKEN and the network, then run the same command again: it pushes what is not pushed "
                        "yet") from None
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"


PUSH_RECORD = "hub_push.json"
# top-level names in an export dir: resume states, temp files, eval outputs, a soup's own push record
NOT_PUSHED = ("step_*", ".*", "eval_*", PUSH_RECORD)


def push_once(record_dir, export_dir, repo_id, token=None, what="model"):
    """Push `export_dir` unless `record_dir`/hub_push.json says this very export went to `repo_id` already: a relaunch
    of the same command pushes a finished run whose push failed, and leaves a pushed one alone. Returns the commit
    URL, or None when there was nothing to push."""
    from .fileio import atomic_write_json, read_json

    record = {"repo_id": repo_id, "what": what, "export": Path(export_dir).name, "files": _export_stamp(export_dir)}
    path = Path(record_dir) / PUSH_RECORD
    if path.is_file() and {k: v for k, v in read_json(path, "push record").items() if k != "commit"} == record:
        return None
    url = push_export(export_dir, repo_id, token, what)
    atomic_write_json(path, {**record, "commit": url})
    return url


def _export_stamp(export_dir):
    """The pushed files as they are (name, size, modification time): another training, or eval_lt.py's card update,
    rewrites them."""
    files = sorted(p for p in Path(export_dir).rglob("*") if p.is_file() and not any(
        fnmatch.fnmatch(p.relative_to(export_dir).parts[0], pattern) for pattern in NOT_PUSHED))
    return [[str(p.relative_to(export_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def check_adapter_push(what, method_is_peft, base_model):
    """--hub_push adapter, before any compute: only a LoRA run has a plain adapter, and the adapter names its base by
    the id a Hub user can load (a local folder is no such id)."""
    if what != "adapter":
        return
    if not method_is_peft:
        raise UserError("--hub_push adapter pushes a LoRA run's peft adapter, and this method has none; use "
                        "--hub_push model")
    if hub_id(base_model) is None:
        raise UserError(f"--hub_push adapter: the adapter would name its base by the local folder {base_model}, which "
                        "Hub users cannot load; train from the base's Hub id, or push the whole model (--hub_push model)")
