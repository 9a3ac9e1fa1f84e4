"""CNN backbones: the CIFAR ResNet family (a transformers PreTrainedModel of this project) and transformers' own
ResNetModel; BatchNorm through EMA and soups; --dry_run parameter counts; the method set CNNs support."""
import json
import subprocess
import sys

import pytest
import torch

from helpers_data import write_cifar100
from helpers_cli import run_cli
from helpers_train import REPO, assert_resumed_weights, export_tensors, run_main, tiny_train_args, write_synthetic_idx

RESNET8 = REPO / "configs" / "models" / "cifar_resnet8"
RESNET34 = REPO / "configs" / "models" / "cifar_resnet34"


def resnet34_hand_count(num_classes):
    """CIFAR ResNet-34 (LOS): 3x3 stem 3->64 + BN; stages of 3/4/6/3 basic blocks at 64/128/256/512 channels, each
    block two 3x3 convs + two BNs, a 1x1 conv + BN shortcut where the shape changes; linear head with bias."""
    conv3, bn = lambda i, o: 9 * i * o, lambda c: 2 * c
    total = conv3(3, 64) + bn(64)
    cin = 64
    for depth, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        for _ in range(depth):
            total += conv3(cin, width) + bn(width) + conv3(width, width) + bn(width)
            if cin != width:
                total += cin * width + bn(width)
            cin = width
    return total + 512 * num_classes + num_classes


def test_resnet34_hand_count_is_the_known_size():
    assert resnet34_hand_count(100) == 21_328_292  # 21.28 M backbone + 51,300 head: "ResNet-34 (21.3 M)"


def test_dry_run_builds_cifar_resnet34_for_100_classes(tmp_path, capsys):
    data = write_cifar100(tmp_path / "c100", per_class_train=2, per_class_test=1)
    out = tmp_path / "run"
    counts = run_main(["--config", str(REPO / "configs/los_cifar100_stage1.yaml"), "--data_dir", str(data), "--imb", "1",
                       "--val_per_class", "0", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
                       "--num_workers", "0", "--dry_run"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == counts
    assert printed["trainable"] == printed["total"] == resnet34_hand_count(100)
    assert printed["head"] == 512 * 100 + 100  # linear, with bias
    assert printed["backbone_kind"] == "cifar_resnet" and printed["backbone"] == printed["trainable"] - printed["head"]
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.slow  # a fresh interpreter without this project
def test_cifar_resnet_saves_and_loads_through_the_auto_classes_without_this_project(tmp_path):
    from lt_utils.cifar_resnet import CifarResNetConfig, CifarResNetModel

    torch.manual_seed(0)
    model = CifarResNetModel(CifarResNetConfig.from_preset("resnet32")).eval()
    assert sum(p.numel() for p in model.parameters()) == 463_504  # LDAM's ResNet-32: 0.46 M
    model.save_pretrained(tmp_path / "r32")
    x = torch.randn(2, 3, 32, 32)
    torch.save({"x": x, "y": model(x).pooler_output}, tmp_path / "ref.pt")
    # a fresh interpreter in another directory: lt_utils is not importable, the saved folder's own code is used
    code = ("import torch, transformers\n"
            "try:\n    import lt_utils\n    raise SystemExit('lt_utils importable')\nexcept ImportError:\n    pass\n"
            f"m = transformers.AutoModel.from_pretrained({str(tmp_path / 'r32')!r}, trust_remote_code=True).eval()\n"
            f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
            "print(type(m).__name__, float((m(ref['x']).pooler_output - ref['y']).abs().max()))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    name, diff = result.stdout.split()[-2:]
    assert name == "CifarResNetModel" and float(diff) == 0.0


def test_transformers_resnet_is_a_backbone_kind(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    from lt_utils.errors import UserError
    from lt_utils.models import build_lt_model
    from lt_utils.peft_methods import apply_method, trainable_parameter_count

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    torch.manual_seed(0)
    ResNetModel(config).save_pretrained(tmp_path / "resnet")
    lt = build_lt_model(tmp_path / "resnet", 5, head_type="linear")
    assert (lt.spec.kind, lt.spec.hidden_size, lt.spec.num_layers, lt.spec.image_size) == ("resnet", 16, 2, 224)
    lt.eval()
    assert lt(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    apply_method(lt, "bitfit_all")  # BatchNorm shifts + the head
    bn_biases = sum(m.bias.numel() for m in lt.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert trainable_parameter_count(lt) == bn_biases + 5 * 16 + 5
    for method in ("adaptformer", "lora"):
        with pytest.raises(UserError, match=f"--method {method} does not apply to resnet backbones; choose one of full_all, bitfit_all, head"):
            apply_method(build_lt_model(tmp_path / "resnet", 5), method)


def test_unsupported_method_is_a_one_line_error(tmp_path):
    idx = write_synthetic_idx(tmp_path / "idx")
    out = tmp_path / "run"
    result = run_cli("train_lt.py", *tiny_train_args(idx, out, "--model_name_or_path", RESNET8, "--method", "lora"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == ("error: --method lora does not apply to cifar_resnet backbones; "
                                                      "choose one of full_all, bitfit_all, head")
    assert "Traceback" not in result.stderr


def test_ema_averages_running_statistics():
    from lt_utils.engine import EMA
    from lt_utils.models import build_lt_model
    from lt_utils.peft_methods import apply_method

    lt = apply_method(build_lt_model(RESNET8, 3, head_type="linear", from_scratch=True), "full_all")
    ema = EMA(lt, 0.5)
    before = lt.backbone.bn1.running_mean.clone()
    lt.train()
    with torch.no_grad():
        lt(torch.randn(4, 3, 32, 32) + 2.0)
    ema.update(lt)
    after = lt.backbone.bn1.running_mean.clone()
    torch.testing.assert_close(ema.shadow["backbone.bn1.running_mean"], 0.5 * before + 0.5 * after)
    assert ema.shadow["backbone.bn1.num_batches_tracked"].item() == 1  # copied, not averaged
    ema.swap(lt)
    torch.testing.assert_close(lt.backbone.bn1.running_mean, 0.5 * before + 0.5 * after)
    assert lt.backbone.bn1.num_batches_tracked.item() == 1


def test_backbone_bn_eval_keeps_running_statistics_during_training():
    from lt_utils.models import build_lt_model

    lt = build_lt_model(RESNET8, 3, head_type="linear", from_scratch=True)
    lt.backbone_eval = True
    lt.train()
    assert lt.head.training and not lt.backbone.bn1.training
    before = lt.backbone.bn1.running_mean.clone()
    with torch.no_grad():
        lt(torch.randn(4, 3, 32, 32) + 2.0)
    assert torch.equal(lt.backbone.bn1.running_mean, before)
    lt.backbone_eval = False
    lt.train()
    with torch.no_grad():
        lt(torch.randn(4, 3, 32, 32) + 2.0)
    assert not torch.equal(lt.backbone.bn1.running_mean, before)


def test_soup_averages_running_statistics_and_keeps_the_most_batches(tmp_path):
    from lt_utils.soup import make_soup

    idx = write_synthetic_idx(tmp_path / "idx")
    runs = {}
    for name, lr, steps in (("a", "0.05", "2"), ("b", "0.02", "3")):
        runs[name] = tmp_path / name
        run_main(tiny_train_args(idx, runs[name], "--model_name_or_path", RESNET8, "--head_type", "linear",
                                 "--optimizer", "sgd", "--learning_rate", lr, "--max_train_steps", steps,
                                 "--eval_steps", "none"))
    make_soup([runs["a"] / "final", runs["b"] / "final"], tmp_path / "soup")
    a, b = (export_tensors(runs[n] / "final") for n in "ab")
    soup = export_tensors(tmp_path / "soup")
    for key in ("backbone.bn1.running_mean", "backbone.stages.2.0.bn2.running_var", "backbone.conv1.weight"):
        assert not torch.equal(a[key], b[key])
        torch.testing.assert_close(soup[key], (a[key] + b[key]) / 2)
    assert soup["backbone.bn1.num_batches_tracked"].item() == 3  # the larger of 2 and 3


def test_resume_restores_running_statistics_exactly(tmp_path):
    import shutil

    from safetensors.torch import load_file

    idx = write_synthetic_idx(tmp_path / "idx")
    flags = ["--model_name_or_path", RESNET8, "--head_type", "linear", "--optimizer", "sgd", "--learning_rate", "0.05",
             "--max_train_steps", "4", "--eval_steps", "none", "--checkpointing_steps", "2", "--augment", "crop_flip"]
    run_main(tiny_train_args(idx, tmp_path / "full", *flags))
    state = load_file(tmp_path / "full" / "step_2" / "model.safetensors")
    assert state["backbone.bn1.num_batches_tracked"].item() == 2  # the resume state holds the running statistics
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "step_2", tmp_path / "resumed" / "step_2")
    run_main(tiny_train_args(idx, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest"))
    full = export_tensors(tmp_path / "full" / "final")
    resumed = export_tensors(tmp_path / "resumed" / "final")
    assert_resumed_weights(resumed, full)
    assert resumed["backbone.bn1.num_batches_tracked"].item() == 4


@pytest.mark.parametrize("sync_bn,method,warned", [(False, "full_all", True), (True, "full_all", False),
                                                   (False, "head", False)])
def test_ddp_without_sync_bn_warns_once_where_batchnorm_trains(caplog, sync_bn, method, warned):
    """Several processes, BatchNorm in train mode and no --sync_bn: a warning naming --sync_bn (on the main process
    only); none with --sync_bn or with a frozen eval-mode backbone (head-only)."""
    import argparse
    import logging

    from lt_utils.models import build_lt_model
    from lt_utils.training import setup_batchnorm

    from lt_utils.spec import MethodSpec, OptimSpec

    lt = build_lt_model(RESNET8, 3, head_type="linear", from_scratch=True)
    method_spec, optim = MethodSpec(method=method), OptimSpec(sync_bn=sync_bn, per_device_train_batch_size=8)
    for main_process in (True, False):
        accelerator = argparse.Namespace(num_processes=2, is_main_process=main_process)
        with caplog.at_level(logging.WARNING, logger="lt"):
            setup_batchnorm(method_spec, optim, accelerator, lt, lt)
    messages = [r.getMessage() for r in caplog.records if r.name == "lt"]
    assert len(messages) == int(warned)
    if warned:
        assert "without --sync_bn" in messages[0] and "its own 8 images" in messages[0]
