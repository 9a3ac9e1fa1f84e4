"""Deterministic head initialisations (soups need identical head inits across runs): CLIP / SigLIP text features,
class means (of all or of k seeded images per class), a class-balanced linear probe."""
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .axes import HEAD_INITS  # noqa: F401  (the --head_init registry of the functions below, imported from here)
from .errors import UserError, first_line, require
from .heads import random_head_init
from .models import BACKBONES, feature_dim, load_backbone_config, unwrap_lt_model
from .prompts import class_prompts


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_text_tower(model_name_or_path, use):
    """(tower, full image-text model in eval mode, tokenizer, kind, vision config) of a CLIP / SigLIP checkpoint;
    `use` names the caller in the errors ("text head init", "--zero_shot")."""
    from transformers import AutoTokenizer

    name = os.path.expanduser(str(model_name_or_path))
    kind, config, vision_config = load_backbone_config(name)
    tower = BACKBONES.get(kind).text_tower
    with_text = sorted(k for k in BACKBONES if BACKBONES.get(k).text_tower is not None)
    if tower is None or config.model_type != tower.model_type:
        full = "" if tower is None else f" (a full {tower.model_type!r} checkpoint, not its vision tower alone)"
        raise UserError(f"{use} needs an image-text checkpoint with its text tower{full}; {name!r} is a "
                        f"{config.model_type!r} model (text towers: {', '.join(with_text)}); use --head_init class_mean")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = tower.load_model(name)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"cannot load the {tower.model_class} text tower or tokenizer from {name!r} "
                        f"({first_line(err)}); pass a full checkpoint saved with its tokenizer, or use --head_init "
                        "class_mean") from err
    return tower, model.eval(), tokenizer, kind, vision_config


@torch.no_grad()
def text_head_init(model_name_or_path, class_names, prompts="single", batch_size=256, device=None, descriptor_file=None):
    """Text features of the class prompts mapped into the vision feature space, rows unit-norm [C, hidden].

    Per class: mean of the normalised joint-space text embeddings over its prompts, renormalised; then the
    backbone's text tower maps it to the space LTModel.features lives in (CLIP: `@ visual_projection.weight`, LIFT's
    text_feat @ proj.T; SigLIP: the same space), and rows are normalised again.
    """
    if not class_names:
        raise UserError("text head init needs at least one class name")
    prompts_per_class = class_prompts(prompts, class_names, descriptor_file)
    tower, model, tokenizer, _, vision_config = load_text_tower(model_name_or_path, "text head init")
    problem = tower.check(model, vision_config.hidden_size, str(model_name_or_path))
    if problem:
        raise UserError(f"text head init: {problem}; use --head_init class_mean")
    device = torch.device(device or _default_device())
    model.to(device)
    text = tower.class_embeddings(model, tokenizer, prompts_per_class, batch_size, device)
    weight = F.normalize(tower.to_feature_space(model, text), dim=-1)
    del model  # the text tower is only needed here
    return weight.cpu()


@torch.no_grad()
def class_mean_head_init(model, dataloader, num_classes):
    """Normalised per-class mean of frozen features [C, D]; batches are dicts {"pixel_values", "labels"}.

    Pass an unsharded loader: every process then computes the same head.
    """
    lt = unwrap_lt_model(model)
    device = next(lt.parameters()).device
    was_training = lt.training
    lt.eval()
    sums = counts = None
    try:
        for batch in tqdm(dataloader, desc="class means"):
            feats = lt.features(batch["pixel_values"].to(device)).float()
            labels = torch.as_tensor(batch["labels"], device=device).long()
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if bad.numel():
                raise UserError(
                    f"class-mean head init: label {bad[0].item()} outside 0..{num_classes - 1}; wrong num_classes?"
                )
            if sums is None:
                sums = torch.zeros(num_classes, feats.shape[-1], device=device)
                counts = torch.zeros(num_classes, device=device)
            sums.index_add_(0, labels, feats)
            counts += torch.bincount(labels, minlength=num_classes)[:num_classes].float()
    finally:
        lt.train(was_training)
    empty = [] if counts is None else (counts == 0).nonzero().flatten().tolist()
    if counts is None or empty:
        shown = "all" if counts is None else empty[:10]
        raise UserError(
            f"class-mean head init: classes {shown} have no training images; use --head_init text or random"
        )
    return F.normalize(sums / counts[:, None], dim=-1).cpu()


@torch.no_grad()
def frozen_features(model, dataloader):
    """(features [N, D] float32, labels [N]) of the frozen backbone over an unsharded loader, on CPU."""
    lt = unwrap_lt_model(model)
    device = next(lt.parameters()).device
    was_training = lt.training
    lt.eval()
    feats, labels = [], []
    try:
        for batch in tqdm(dataloader, desc="features"):
            feats.append(lt.features(batch["pixel_values"].to(device)).float().cpu())
            labels.append(torch.as_tensor(batch["labels"]).long().cpu())
    finally:
        lt.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def balanced_logistic_regression(features, labels, num_classes, c=1.0, max_iter=1000, device=None):
    """(W [C, D], b [C]) minimising C * sum_i w_{y_i} CE(W x_i + b, y_i) + ||W||^2 / 2, w_c = N / (C n_c).

    scikit-learn's LogisticRegression(penalty="l2", class_weight="balanced", multinomial, C=1) objective, which
    LIFT fits on frozen features; solved with torch's L-BFGS (strong Wolfe line search) in float64, on `device`
    (CPU or GPU), run to convergence (LIFT stops scikit-learn's L-BFGS at 100 iterations).
    """
    device = torch.device(device or _default_device())
    x = features.to(device, torch.float64)
    y = labels.to(device).long()
    counts = torch.bincount(y, minlength=num_classes).double()
    empty = (counts == 0).nonzero().flatten().tolist()
    require(not empty, f"linear-probe head init: classes {empty[:10]} have no training images; use --head_init text")
    sample_weight = (len(y) / (num_classes * counts))[y]
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def objective():  # divided by N: the same minimiser, gradients of order 1
        optimizer.zero_grad()
        ce = F.cross_entropy(x @ weight.T + bias, y, reduction="none")
        loss = (c * (sample_weight * ce).sum() + 0.5 * weight.pow(2).sum()) / len(y)
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def _head_modules(head):
    # peft's modules_to_save wraps the head: keep the trained copy and the original identical.
    if hasattr(head, "modules_to_save"):
        return [head.original_module, *head.modules_to_save.values()]
    return [head]


@torch.no_grad()
def set_head_weight(model, weight):
    """Copy `weight` [C, D] into the head (a linear head's bias is zeroed)."""
    for head in _head_modules(unwrap_lt_model(model).head):
        if tuple(head.weight.shape) != tuple(weight.shape):
            raise UserError(
                f"head init has shape {tuple(weight.shape)} but the head is {tuple(head.weight.shape)}; "
                "the class list and the model disagree"
            )
        head.weight.copy_(weight.to(head.weight.device, head.weight.dtype))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


# `--head_init`: f(model, info, lt_model, accelerator, train_loader_fn) -> the head weight [C, D] on CPU, the same in
# every run given the same inputs (soups rely on it); model: the run's spec.ModelSpec (checkpoint, prompts, seed);
# train_loader_fn(spec) gives an unsharded eval-view train loader.


def _text(model, info, lt_model, accelerator, train_loader_fn):
    require(BACKBONES.get(lt_model.spec.kind).text_tower is not None and not model.from_scratch,
            "--head_init text needs a pretrained image-text checkpoint (CLIP, SigLIP); use --head_init class_mean or "
            "random")
    return text_head_init(model.model_name_or_path, info.class_names, prompts=model.prompt_template,
                          descriptor_file=model.prompt_descriptor_file)


def _class_mean(model, info, lt_model, accelerator, train_loader_fn):
    lt_model.to(accelerator.device)
    return class_mean_head_init(lt_model, train_loader_fn(lt_model.spec), len(info.class_names)).cpu()


def _k_shot_means(k):
    def init(model, info, lt_model, accelerator, train_loader_fn):
        lt_model.to(accelerator.device)
        loader = train_loader_fn(lt_model.spec, shots=k)
        return class_mean_head_init(lt_model, loader, len(info.class_names)).cpu()

    return init


_1_shot, _10_shot, _100_shot = _k_shot_means(1), _k_shot_means(10), _k_shot_means(100)


def _linear_probe(model, info, lt_model, accelerator, train_loader_fn):
    lt_model.to(accelerator.device)
    features, labels = frozen_features(lt_model, train_loader_fn(lt_model.spec))
    weight, _ = balanced_logistic_regression(features, labels, len(info.class_names), device=accelerator.device)
    return F.normalize(weight, dim=-1).float().cpu()  # LIFT keeps the normalised rows, not the bias


def _random(model, info, lt_model, accelerator, train_loader_fn):
    return random_head_init(len(info.class_names), feature_dim(lt_model.spec), seed=model.seed)
