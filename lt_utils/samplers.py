"""Class-balanced sampling that stays in step across processes."""
import torch
from torch.utils.data import Sampler

from .errors import UserError


class ClassBalancedSampler(Sampler):
    """Draw a class with probability proportional to n_c**power (0: balanced, 0.5: square-root, 1: instance),
    then one of its images uniformly, with replacement.

    Every draw comes from `self.generator`, re-seeded from (seed, epoch) at the start of each pass: all processes
    draw the same stream and take their own shard of it, and a resumed run replays exactly the epoch it left
    (accelerate calls `set_epoch` on the sampler; the generator is also the one it would synchronise).
    """

    def __init__(self, labels, num_samples=None, power=0.0, seed=0):
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() == 0:
            raise UserError("class-balanced sampler: the training set is empty")
        if num_samples is not None and int(num_samples) < 1:
            raise UserError(f"class-balanced sampler: num_samples must be >= 1, got {num_samples}")
        classes, counts = torch.unique(labels, return_counts=True)
        # Images grouped by class: class i owns order[offsets[i] : offsets[i] + counts[i]].
        self.order = torch.argsort(labels, stable=True)
        self.offsets = torch.cumsum(counts, 0) - counts
        self.counts = counts
        self.classes = classes
        self.class_weights = counts.double() ** float(power)
        self.num_samples = int(num_samples) if num_samples is not None else labels.numel()
        self.seed, self.epoch = int(seed), 0
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn = torch.multinomial(self.class_weights, self.num_samples, replacement=True, generator=self.generator)
        u = torch.rand(self.num_samples, dtype=torch.float64, generator=self.generator)
        within = (u * self.counts[drawn]).long().clamp_max(self.counts[drawn] - 1)
        yield from self.order[self.offsets[drawn] + within].tolist()
