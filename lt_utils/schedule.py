"""Step arithmetic and the learning rate as a pure function of the optimizer step.

No scheduler object is prepared: the lr is set on every optimizer step from `lr_at(step)`, so resuming
needs only the step counter and the schedule is the same on 1 or N processes (an accelerate-prepared scheduler
steps once per process on every optimizer step).
"""
import math
from dataclasses import dataclass

from .errors import UserError

# transformers' SchedulerType names whose lr is a function of the step alone: the factor of the peak lr at optimizer
# step `step` (0-based), as transformers.get_scheduler's LambdaLR gives it before that step; the warm-up rises
# step / warmup from 0 (cosine and constant above rise (step + 1) / warmup)
def _hf_warmup(step, warmup):
    return step / max(1, warmup)


HF_SCHEDULES = {
    "linear": lambda step, warmup, total: (_hf_warmup(step, warmup) if step < warmup
                                           else max(0.0, (total - step) / max(1, total - warmup))),
    "constant_with_warmup": lambda step, warmup, total: _hf_warmup(step, warmup) if step < warmup else 1.0,
    # transformers' timescale: the warm-up length, 10,000 without one
    "inverse_sqrt": lambda step, warmup, total: (_hf_warmup(step, warmup) if step < warmup
                                                 else 1.0 / math.sqrt((step + (warmup or 10_000) - warmup)
                                                                      / (warmup or 10_000))),
}
SCHEDULES = ("cosine", "cosine_epoch", "constant", *HF_SCHEDULES)


@dataclass(frozen=True)
class StepPlan:
    """How many batches and optimizer steps a run makes, after the dataloader was sharded."""

    batches_per_epoch: int  # per process, after `accelerator.prepare`
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    num_epochs: int

    def batches_to_skip(self, completed_steps, gradient_accumulation_steps):
        """Dataloader batches already consumed in the current epoch when resuming at `completed_steps`."""
        return (completed_steps % self.steps_per_epoch) * gradient_accumulation_steps


def plan_steps(batches_per_epoch, gradient_accumulation_steps, num_train_epochs, max_train_steps=None,
               min_train_steps=None):
    """Epochs or --max_train_steps, raised to --min_train_steps (LT-Soups trains its smallest subsets >= 100 steps).

    A trailing partial accumulation group still steps (accelerate syncs at the end of the dataloader).
    """
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    total = max_train_steps or steps_per_epoch * num_train_epochs
    total = max(total, min_train_steps or 0)
    return StepPlan(batches_per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch))


def lr_at(step, base_lr, total_steps, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0, steps_per_epoch=None,
          warmup_start=None):
    """Learning rate for optimizer step `step` (0-based).

    linear, constant_with_warmup, inverse_sqrt: transformers' (HF_SCHEDULES); min_lr_ratio and warmup_start do not
    apply to them (check_optim_flags).
    cosine: linear warm-up over `warmup_steps` ((step + 1) / warmup_steps of base_lr), then cosine from base_lr to
    min_lr_ratio * base_lr (LT-Soups: 0.1). cosine_epoch: LIFT's per-epoch cosine to min_lr_ratio * base_lr,
    constant within an epoch.
    warmup_start (LT-Soups' shape, 1e-6 there): the warm-up runs linearly from warmup_start * base_lr at step 0
    to base_lr at step `warmup_steps` inclusive, and the cosine starts one step later.
    """
    if schedule in HF_SCHEDULES:
        return base_lr * HF_SCHEDULES[schedule](step, warmup_steps, total_steps)
    shift = 0
    if warmup_steps and warmup_start is not None:
        if step <= warmup_steps:
            return base_lr * (warmup_start + (1.0 - warmup_start) * step / warmup_steps)
        shift = 1  # the warm-up's last step is the peak; the cosine begins after it
    if schedule == "constant":
        return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps and not shift else base_lr
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine_epoch":
        num_epochs = max(1, math.ceil(total_steps / steps_per_epoch))
        progress = (step // steps_per_epoch) / num_epochs
    else:
        progress = (step - shift - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    floor = min_lr_ratio * base_lr
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def check_schedule_flags(evaluation):
    """--num_evals replaces --eval_steps (left at 'epoch'), in a run's spec.EvalSpec; checked before anything is
    written (each flag's range is checked by the flag table)."""
    if evaluation.num_evals is None:
        return
    if str(evaluation.eval_steps) != "epoch":
        raise UserError(f"--num_evals {evaluation.num_evals} and --eval_steps {evaluation.eval_steps} both set the "
                        "validation schedule; pass one of them")


def check_optim_flags(optim):
    """--min_lr_ratio and --warmup_start_factor shape the project's cosine / constant only: refused with
    transformers' schedules rather than ignored."""
    if optim.lr_scheduler_type not in HF_SCHEDULES:
        return
    for flag, unset in (("min_lr_ratio", 0.0), ("warmup_start_factor", None)):
        if getattr(optim, flag) != unset:
            raise UserError(f"--{flag} {getattr(optim, flag)} does not apply to --lr_scheduler_type "
                            f"{optim.lr_scheduler_type}; drop it or use --lr_scheduler_type cosine")


def eval_interval(num_evals, total_steps):
    """--num_evals N: evaluate every total_steps // N optimizer steps (LT-Soups: N = 5, and no extra evaluation at
    the end when N does not divide the run); at least every step."""
    return max(1, total_steps // num_evals)
