"""Fixtures shared by the test modules: tiny CLIP and ViT checkpoints written with save_pretrained, small IDX data."""
import os

# One torch thread per test process, set before torch is imported: pytest-xdist runs 2 workers on 2 cores, where a
# second OpenMP thread per worker only spins (test_train_lt.py: 25 s of CPU with 1 thread, 111 s with 2); the
# entry scripts' subprocesses already ran with 1 (helpers_train.QUIET_ENV), so in-process runs compute the same.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers_models import make_tiny_clip, make_tiny_vit  # noqa: E402
from helpers_train import write_synthetic_idx  # noqa: E402

# the module-scoped one-process reference of the DDP and DeepSpeed tests
pytest_plugins = ["helpers_distributed"]


# session-scoped: read-only inputs, built once per test process instead of once per module
@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    return make_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit")


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    return write_synthetic_idx(tmp_path_factory.mktemp("synthetic_idx"))


# pytest.ini runs pytest-xdist with --dist loadfile --no-loadscope-reorder: a module's tests (and its module-scoped
# fixtures: trained runs, fork servers) stay on one worker, and modules are handed out in collection order as the
# workers free up. Longest first (measured on 2 cores) keeps the two workers finishing together; unlisted modules
# follow in their usual order.
LONGEST_FIRST = ["test_learning.py", "test_deepspeed.py", "test_distributed.py", "test_reliability_faults.py",
                 "test_lt_soups_recipe.py", "test_learning_los.py", "test_launch.py", "test_performance.py",
                 "test_reproduce.py", "test_eval_lt.py", "test_reliability_inputs.py", "test_soup.py",
                 "test_packaging.py", "test_lift_methods.py", "test_hub_push.py", "test_hub_exports.py",
                 "test_backbones.py", "test_campaign_paths.py", "test_resnet.py", "test_train_lt.py",
                 "test_reliability_campaign.py", "test_metrics.py", "test_usage.py", "test_lt_soups_parity.py",
                 "test_merge_strategies.py", "test_data_builders.py", "test_data_fmnist_real.py", "test_fidelity.py",
                 "test_data_hf_generic.py", "test_one_record.py", "test_run_spec.py", "test_hub_dataset.py",
                 "test_hf_vocabulary.py", "test_peft_methods.py", "test_models.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
