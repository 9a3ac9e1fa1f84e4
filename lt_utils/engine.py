"""The training and evaluation loops, shared by train_lt.py, eval_lt.py and soup.py (DeiT's engine split)."""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .compile import plain_name
from .metrics import compute_lt_metrics
from .schedule import lr_at, set_lr


@dataclass
class TrainState:
    """Counters that must survive a resume; saved by `accelerator.register_for_checkpointing`."""

    completed_steps: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    last_good_checkpoint: str = ""
    kept: dict = field(default_factory=dict)  # --protocol's other kept exports: {name: [best score, its step]}

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


class NonFiniteLoss(Exception):
    def __init__(self, step, value):
        super().__init__(f"loss became {value} at optimizer step {step}")
        self.step, self.value = step, value


def forward_views(model, inputs):
    """Logits for a batch; with test-time views ([B, V, ...] inputs) the logits are averaged over the views.

    Images ([B, V, 3, H, W]) run one view at a time: activation memory stays that of a one-view batch, and a
    V-times larger batch is no faster per image (measured slower on CPU: benchmarks/README.md). Cached features
    ([B, V, D]) are cheap and run as one batch.
    """
    if inputs.ndim == 5:
        return torch.stack([model(inputs[:, v]).float() for v in range(inputs.shape[1])], dim=1).mean(dim=1)
    if inputs.ndim == 3:
        b, v = inputs.shape[:2]
        return model(inputs.flatten(0, 1)).float().view(b, v, -1).mean(dim=1)
    return model(inputs)


def loss_is_finite_everywhere(loss, accelerator):
    """One process with a NaN loss must stop all of them, or the others hang in the next all-reduce."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def train_one_epoch(model, loader, optimizer, loss_fn, accelerator, state, schedule, *, max_grad_norm=None,
                    ema=None, on_step=None, progress=None, batch_transform=None):
    """One pass over `loader`; returns the mean training loss of the optimizer steps it made.

    `schedule(step) -> lr` is set before every optimizer step; `on_step(step)` runs after each one (evaluation,
    checkpointing) and may return True to stop early. `batch_transform(batch) -> pixel_values` finishes the
    augmentation on the batch's device (--augment_on_device).
    """
    model.train()
    total_loss, losses_seen = 0.0, 0
    for batch in loader:
        with accelerator.accumulate(model):
            # before backward: under DeepSpeed the optimizer step happens inside accelerator.backward
            set_lr(optimizer, schedule(state.completed_steps))
            logits = model(batch["pixel_values"] if batch_transform is None else batch_transform(batch))
            loss = loss_fn(logits.float(), batch["labels"])
            if not loss_is_finite_everywhere(loss, accelerator):
                raise NonFiniteLoss(state.completed_steps + 1, loss.item())
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total_loss += loss.item()
        losses_seen += 1
        if not accelerator.sync_gradients:
            continue
        state.completed_steps += 1
        if ema is not None:
            ema.update(model)
        lr = schedule(state.completed_steps - 1)
        accelerator.log({"train/loss": loss.item(), "train/lr": lr}, step=state.completed_steps)  # no-op without trackers
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if on_step is not None:
            if on_step(state.completed_steps):
                break
            model.train()  # a validation in on_step left the model in eval mode (dropout, BatchNorm statistics)
    return total_loss / max(1, losses_seen)


@torch.no_grad()
def predict(model, loader, accelerator, desc="eval", top_k=0):
    """Gathered (preds, labels, per-sample NLL) over a prepared loader, exactly once per sample on any number of
    processes, in dataset order; with `top_k`, also the top-k softmax probabilities and classes ([N, k] each)."""
    model.eval()
    stores = [[] for _ in range(5 if top_k else 3)]
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process)
    for batch in bar:
        logits = forward_views(model, batch["pixel_values"]).float()
        sample_nll = F.cross_entropy(logits, batch["labels"], reduction="none")
        values = (logits.argmax(dim=-1), batch["labels"], sample_nll)
        if top_k:
            values += tuple(logits.softmax(dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1))
        for store, value in zip(stores, accelerator.gather_for_metrics(values)):
            store.append(value.cpu())
    return tuple(torch.cat(store) for store in stores)


def evaluate(model, loader, accelerator, groups, num_classes, desc="eval", top_k=0):
    """Long-tail metrics (overall, mean-class, many/medium/few, ...) of `model` on a prepared loader; with `top_k`,
    (metrics, per-image predictions {"labels", "top_probs", "top_classes"})."""
    preds, labels, nll, *top = predict(model, loader, accelerator, desc=desc, top_k=top_k)
    metrics = compute_lt_metrics(preds, labels, num_classes, groups, sample_nll=nll)
    if not top_k:
        return metrics
    return metrics, {"labels": labels, "top_probs": top[0], "top_classes": top[1]}


def linear_warmup_cosine(optim, plan):
    """The run's lr function of the optimizer step, from its spec.OptimSpec."""
    warmup = optim.num_warmup_steps
    if warmup is None and optim.optimizer == "adamw":
        # LT-Soups: max(20, 1% of the steps); capped at a fifth of the run so short runs still decay
        warmup = min(int(max(20, 0.01 * plan.total_steps)), plan.total_steps // 5)

    def schedule(step):
        return lr_at(step, optim.learning_rate, plan.total_steps, optim.lr_scheduler_type, warmup or 0,
                     optim.min_lr_ratio, plan.steps_per_epoch, warmup_start=optim.warmup_start_factor)

    return schedule


class EMA:
    """Exponential moving average of the trainable parameters (LT-Soups: decay 0.99), kept in float32; BatchNorm
    running means and variances are averaged alike (timm's ModelEma), integer buffers (num_batches_tracked) copied.

    start "initial": the average starts from the weights before training. "first_step": torch `AveragedModel`
    semantics (LT-Soups): the first update copies the weights, later ones average.
    """

    def __init__(self, model, decay, start="initial"):
        self.decay = decay
        self.copy_next = start == "first_step"
        # eager names, so a resume with or without --torch_compile finds them
        self.shadow = {plain_name(n): t.detach().float().clone() for n, t in self._tracked(model)}

    @staticmethod
    def _tracked(model):
        from .batchnorm import is_running_stat

        yield from ((n, p) for n, p in model.named_parameters() if p.requires_grad)
        yield from ((n, b) for n, b in model.named_buffers() if is_running_stat(n))

    @torch.no_grad()
    def update(self, model):
        for name, tensor in self._tracked(model):
            name = plain_name(name)
            if name in self.shadow:
                if self.copy_next or not tensor.is_floating_point():
                    self.shadow[name].copy_(tensor.detach().float())
                else:
                    self.shadow[name].lerp_(tensor.detach().float(), 1.0 - self.decay)
        self.copy_next = False

    @torch.no_grad()
    def swap(self, model):
        """Exchange the model's tracked tensors with the averaged ones (call twice to swap back)."""
        for name, tensor in self._tracked(model):
            name = plain_name(name)
            if name in self.shadow:
                current = tensor.detach().float().clone()
                tensor.copy_(self.shadow[name].to(tensor.dtype))
                self.shadow[name] = current

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow, "copy_next": self.copy_next}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.copy_next = state.get("copy_next", False)
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}
