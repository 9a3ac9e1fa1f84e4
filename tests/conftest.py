"""Fixtures shared by the test modules: tiny CLIP and ViT checkpoints written with save_pretrained, small IDX data."""
import pytest

from helpers_models import make_tiny_clip, make_tiny_vit
from helpers_train import write_synthetic_idx


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return make_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit")


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_synthetic_idx(tmp_path_factory.mktemp("synthetic_idx"))
