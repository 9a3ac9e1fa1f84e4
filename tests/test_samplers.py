"""ClassBalancedSampler: class frequencies, determinism, the shared generator, sharding under accelerate."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lt_utils.errors import UserError
from lt_utils.samplers import ClassBalancedSampler

# Long-tailed labels: class 0 has 100 images, class 1 has 10, class 2 has 1 (interleaved, not sorted).
LABELS = torch.tensor([0] * 100 + [1] * 10 + [2])[torch.randperm(111, generator=torch.Generator().manual_seed(0))]


def _class_freq(indices, labels=LABELS):
    drawn = labels[torch.tensor(indices)]
    return torch.bincount(drawn, minlength=3).double() / len(indices)


SQRT_TOTAL = 10 + 10**0.5 + 1  # square-root weights of the counts 100, 10, 1


@pytest.mark.parametrize(
    "power,expected",
    [
        (0.0, [1 / 3] * 3),
        (0.5, [10 / SQRT_TOTAL, 10**0.5 / SQRT_TOTAL, 1 / SQRT_TOTAL]),
        (1.0, [100 / 111, 10 / 111, 1 / 111]),
    ],
)
def test_class_frequencies(power, expected):
    indices = list(ClassBalancedSampler(LABELS, num_samples=30000, power=power, seed=1))
    torch.testing.assert_close(_class_freq(indices), torch.tensor(expected, dtype=torch.float64), atol=0.015, rtol=0)


def test_images_uniform_within_class():
    indices = torch.tensor(list(ClassBalancedSampler(LABELS, num_samples=30000, seed=2)))
    class1 = (LABELS == 1).nonzero().flatten()
    per_image = torch.stack([(indices == i).sum() for i in class1]).double()
    assert per_image.min() > 0.7 * per_image.mean() and per_image.max() < 1.3 * per_image.mean()
    assert set(indices.tolist()) == set(range(111))  # every image reachable, nothing out of range


def test_length_and_determinism():
    sampler = ClassBalancedSampler(LABELS, seed=5)
    assert len(sampler) == 111
    first = list(sampler)
    assert len(first) == 111 and list(sampler) == first  # a pass is a function of (seed, epoch): resumable
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first  # a new epoch draws anew
    again = ClassBalancedSampler(LABELS.tolist(), seed=5)
    assert list(again) == first
    again.set_epoch(1)
    assert list(again) == second
    assert list(ClassBalancedSampler(LABELS, seed=6)) != first


def test_draws_only_from_generator():
    sampler = ClassBalancedSampler(LABELS, num_samples=50, seed=0)
    assert isinstance(sampler.generator, torch.Generator)
    state = sampler.generator.get_state()
    torch.manual_seed(123)
    first = list(sampler)
    torch.manual_seed(999)  # the global RNG plays no part
    sampler.generator.set_state(state)  # what accelerate does when it synchronises ranks
    assert list(sampler) == first


def test_two_ranks_under_accelerate_take_disjoint_shards_of_one_stream():
    from accelerate.data_loader import prepare_data_loader
    from accelerate.state import AcceleratorState, PartialState

    fresh_state = not PartialState._shared_state
    dataset = TensorDataset(torch.arange(111))
    reference = list(ClassBalancedSampler(LABELS, num_samples=40, seed=3))
    shards = []
    try:
        for rank in range(2):
            loader = DataLoader(dataset, batch_size=4, sampler=ClassBalancedSampler(LABELS, num_samples=40, seed=3))
            prepared = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
            shards.append([batch[0].tolist() for batch in prepared])
    finally:
        if fresh_state:  # leave accelerate's process-wide singleton as other tests found it
            AcceleratorState._reset_state(reset_partial_state=True)
    interleaved = [i for pair in zip(*shards) for batch in pair for i in batch]
    assert interleaved == reference  # rank 0 takes batches 0, 2, ...; rank 1 takes 1, 3, ...


def test_bad_inputs():
    with pytest.raises(UserError, match="empty"):
        ClassBalancedSampler([])
    with pytest.raises(UserError, match="num_samples"):
        ClassBalancedSampler(LABELS, num_samples=0)
