"""BatchNorm across the project: which state-dict keys are running statistics, and --sync_bn.

Running statistics are buffers, not parameters: exports, resume states, EMAs and soups carry them explicitly.
"""
import torch
import torch.distributed as dist
from torch import nn

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def is_running_stat(key):
    return key.rsplit(".", 1)[-1] in RUNNING_STATS


def has_batchnorm(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all processes, on any backend.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces (sum, sum of squares, count) with an autograd-aware
    all_reduce, so it also runs under gloo on CPU. Same maths: biased variance normalises, unbiased updates
    running_var; gradients flow through the global statistics to every process's inputs.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
        local = torch.cat([x.double().sum(dims), (x.double() ** 2).sum(dims), count])
        total = all_reduce(local)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = total[c:2 * c] / n - mean ** 2
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_((var * n / (n - 1)).to(self.running_var.dtype), alpha=m)
        shape = (1, c, 1, 1)
        out = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(model):
    """--sync_bn: torch's SyncBatchNorm on GPUs, CrossProcessBatchNorm2d elsewhere (CPU/gloo). Keys are unchanged."""
    if torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossProcessBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.weight.requires_grad_(child.weight.requires_grad)
            new.bias.requires_grad_(child.bias.requires_grad)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child)
    return model
