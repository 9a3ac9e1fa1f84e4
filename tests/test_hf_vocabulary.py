"""transformers' image-classification vocabulary: its lr schedules (step by step against transformers.get_scheduler),
its flag names as aliases of the project's, --imb none (a source already long-tailed), the image size of
transformers' ResNets."""
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
