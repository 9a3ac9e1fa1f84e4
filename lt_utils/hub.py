"""Model cards and Hub uploads of export dirs."""
from pathlib import Path

from .errors import UserError


def _pct(value):
    return "—" if value is None else f"{value:.2f}"


def model_card(meta, metrics):
    """README.md of an export: what it is, how it was trained, many/medium/few results, how to load it."""
    lines = [
        "---",
        "library_name: " + ("peft" if meta["arch"].get("lora") else "transformers"),
        "pipeline_tag: image-classification",
        f"base_model: {meta['base_model']}" if not meta["from_scratch"] else "",
        "tags: [long-tail, image-classification, lt-hf]",
        "---",
        f"# {meta.get('run_name', 'Long-tail classifier')}",
        "",
        f"Base model `{meta['base_model']}`{' (trained from scratch)' if meta['from_scratch'] else ''}, "
        f"method `{meta['method']}`, {meta['head']['type']} head ({meta['head']['init']} init), "
        f"{meta['num_labels']} classes, dataset `{meta['dataset'].get('dataset')}` (imbalance ratio {meta['dataset'].get('imb')}).",
        "",
        "| split | overall | mean-class | many | medium | few |",
        "|---|---|---|---|---|---|",
    ]
    for split, m in metrics.items():
        if isinstance(m, dict) and "accuracy" in m:
            lines.append(f"| {split} | {_pct(m['accuracy'])} | {_pct(m['mean_class_acc'])} | {_pct(m['many_acc'])} | "
                         f"{_pct(m['medium_acc'])} | {_pct(m['few_acc'])} |")
    groups = meta.get("group_counts", {})
    lines += [
        "",
        f"Groups by training count: many > {meta['many_threshold']} ({groups.get('many', '?')} classes), "
        f"medium {meta['few_threshold']}–{meta['many_threshold']} ({groups.get('medium', '?')}), "
        f"few < {meta['few_threshold']} ({groups.get('few', '?')}). Accuracies in %; an empty group is shown as —.",
        "",
        "## Use",
        "",
        "```python",
        "from lt_utils.checkpoint import load_export",
        "model, meta = load_export(\"<this repo id or folder>\")   # model(pixel_values) -> logits",
        "```",
        "",
        "or evaluate it: `python eval_lt.py <this repo id or folder> --dataset ...`.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def push_export(export_dir, repo_id, token=None, commit_message="Upload long-tail classifier"):
    """Create the repo if needed and upload the export dir (adapter only for PEFT runs: that is all the dir holds)."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo = create_repo(repo_id, exist_ok=True, token=token)
        upload_folder(repo_id=repo.repo_id, folder_path=str(Path(export_dir)), commit_message=commit_message,
                      token=token, ignore_patterns=["step_*", ".*"])
    except Exception as err:  # network, auth, name: the user can fix all of these
        raise UserError(f"pushing {export_dir} to the Hub as {repo_id} failed ({err.__class__.__name__}: {err}); "
                        "check HF_TOKEN and the repo id, then push again with huggingface-cli upload") from None
    return repo.repo_id
