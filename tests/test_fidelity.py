"""Fidelity to the upstream code: image views against pixels LIFT's and LT-Soups' own code computed
(tests/fixtures/upstream), the paper presets' settings and protocols, and what each protocol writes."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_cli import run_cli
from helpers_faults import one_error_line
from helpers_train import REPO, export_tensors, tiny_train_args
from lt_utils import data_loaders as D
from lt_utils.config import build_train_parser, parse_args_with_config
from lt_utils.transforms import build_eval_transform, build_tte_transform

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
IDENTITY = dict(mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)  # views in grey levels


def upstream(name):
    with np.load(UPSTREAM / f"{name}.npz") as f:
        return {key: f[key] for key in f.files}


def fixture_image():
    """The fixtures' input (tests/fixtures/upstream/README.md): 640 x 427, gradients and a 5 x 7 px checkerboard."""
    y, x = np.mgrid[0:427, 0:640]
    return Image.fromarray(np.stack([x * 255 // 639, y * 255 // 426, 255 * ((x // 5 + y // 7) % 2)], -1).astype(np.uint8))


def worst(view, reference, stride):
    """Largest difference in grey levels between a [3, 224, 224] view and an upstream view's sampled pixels."""
    pixels = view.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()[::stride, ::stride]
    return int(np.abs(pixels.astype(int) - reference.astype(int)).max())


def head_init_view(interpolation):
    spec = SimpleNamespace(image_size=224, interpolation=interpolation, **{f"image_{k}": v for k, v in IDENTITY.items()})
    return D.head_init_transform(spec)(fixture_image())


@pytest.mark.parametrize("repo", ["lift", "ltsoups"])
def test_head_inits_see_the_upstream_whole_image_view(repo):
    """Class means, k-shot means and the linear probe average LIFT's Resize(224) + CenterCrop(224), not the eval view."""
    ref = upstream(f"{repo}_views")
    assert worst(head_init_view("bilinear"), ref["plain"], int(ref["stride"])) == 0
    eval_view = build_eval_transform(224, **IDENTITY, interpolation="bilinear")(fixture_image())
    assert worst(eval_view, ref["plain"], int(ref["stride"])) > 100  # what head inits used to see


def test_tencrop_views_are_lifts():
    ref = upstream("lift_views")
    views = build_tte_transform("tencrop", 224, 16, **IDENTITY, interpolation="bilinear")(fixture_image())
    assert worst(views[4], ref["tencrop_centre"], int(ref["stride"])) == 0
    assert worst(views[9], ref["tencrop_mirrored_centre"], int(ref["stride"])) == 0
    assert worst(views[4].flip(-1), ref["tencrop_mirrored_centre"], int(ref["stride"])) > 100  # the mirror of the crop


def test_eval_view_is_lifts_one_column_left():
    """The eval view floors the crop offset as transformers' image processors do (kept, README); LIFT's rounds: on a
    640 x 427 image the 383-px-wide resize is cropped from column 79 here, 80 there, nothing else differs."""
    ref, stride = upstream("lift_views"), int(upstream("lift_views")["stride"])
    ours = build_eval_transform(224, **IDENTITY, interpolation="bilinear")
    resized = ours.transforms[1](torch.from_numpy(np.array(fixture_image())).permute(2, 0, 1)).float()  # the resize
    assert resized.shape[-2:] == (256, 383)
    assert worst(resized[:, 16:240, 80:304], ref["eval"], stride) == 0
    assert torch.equal(ours(fixture_image()), resized[:, 16:240, 79:303])
    assert worst(ours(fixture_image()), ref["eval"], stride) > 100


def preset(name, *extra):
    return parse_args_with_config(build_train_parser(), ["--config", str(REPO / "configs" / name), *map(str, extra)])


PAPER_PROTOCOLS = {"lift_": "final", "los_": "best_test", "ltsoups_": "ema_and_raw_val"}


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                        if p.name.startswith(tuple(PAPER_PROTOCOLS))))
def test_paper_presets_name_their_protocol(path):
    args = preset(path)
    assert args.protocol == next(v for k, v in PAPER_PROTOCOLS.items() if path.startswith(k))
    if args.protocol == "best_test":
        assert args.eval_steps == "epoch"  # LOS tests every epoch
    else:  # LIFT and LT-Soups test without autocast, after training under it
        assert (args.mixed_precision, args.test_precision, args.interpolation) == ("fp16", "fp32", "bilinear")


def test_ltsoups_presets_resize_and_precision_are_ltsoups():
    ref = upstream("ltsoups_views")
    args = preset("ltsoups_stage1_full.yaml")
    assert worst(head_init_view(args.interpolation), ref["plain"], int(ref["stride"])) == 0
    assert worst(head_init_view("bicubic"), ref["plain"], int(ref["stride"])) > 10  # the presets' former resize
    assert (str(ref["prec"]), args.mixed_precision) == ("amp", "fp16")  # amp: fp16 autocast + GradScaler


def test_partial_layers_zero_names_lifts_classifier_only_method(idx_dir, tmp_path):
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, tmp_path / "run", "--method", "adaptformer",
                                                     "--partial_layers", "0"))
    assert result.code == 2 and not (tmp_path / "run").exists()
    assert one_error_line(result.err) == ("error: --partial_layers 0 tunes no block: LIFT's classifier-only fine-tuning "
                                          "is --method head --head_features augmented (drop --partial_layers)")


def test_best_test_needs_validations(idx_dir, tmp_path):
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, tmp_path / "run", "--protocol", "best_test",
                                                     "--eval_steps", "none"))
    assert result.code == 2 and "--protocol best_test tests at each validation" in one_error_line(result.err)


@pytest.fixture(scope="module")
def lt_soups_run(idx_dir, tmp_path_factory):
    """LT-Soups' protocol on the tiny ViT with a linear head: an EMA, trained under bf16 autocast, tested in fp32."""
    out = tmp_path_factory.mktemp("fidelity") / "run"
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, out, "--head_type", "linear", "--ema_decay", "0.5",
                                                     "--protocol", "ema_and_raw_val", "--mixed_precision", "bf16",
                                                     "--test_precision", "fp32", "--max_train_steps", "6",
                                                     "--eval_steps", "3"))
    assert result.code == 0, result.err[-3000:]
    return out, result


def test_ema_and_raw_val_tests_both_models_and_names_the_paper_row(lt_soups_run):
    out, result = lt_soups_run
    results = json.loads((out / "all_results.json").read_text())
    assert list(results) == ["best", "final", "best_raw", "protocol", "paper_row"]
    assert (results["protocol"], results["paper_row"]) == ("ema_and_raw_val", "best")
    ema, raw = export_tensors(out / "best"), export_tensors(out / "best_raw")
    assert not torch.equal(ema["head.weight"], raw["head.weight"])  # the EMA and the raw weights, each kept
    logged = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    raw_scores = [line["validation_raw_mean_class_acc"] for line in logged if "validation_raw_mean_class_acc" in line]
    assert len(raw_scores) == 2 and results["best_raw"]["validation"]["mean_class_acc"] == max(raw_scores)
    best, raw = results["best"]["step"], results["best_raw"]["step"]
    assert f"| best (step {best}, test) [paper] |" in result.out and f"| best_raw (step {raw}, test) |" in result.out


def test_fp32_test_precision_is_what_an_fp32_eval_gives(lt_soups_run, tmp_path):
    out, _ = lt_soups_run
    recorded = json.loads((out / "all_results.json").read_text())["final"]["test"]
    result = run_cli("eval_lt.py", out / "final", "--mixed_precision", "no", "--output_dir", tmp_path / "ev",
                     "--num_workers", "0", "--cache_dir", tmp_path / "hf_cache")
    assert result.code == 0, result.err[-3000:]
    assert next(iter(result.value.values()))["nll"] == pytest.approx(recorded["nll"], abs=1e-6)
    result = run_cli("eval_lt.py", out / "final", "--mixed_precision", "bf16", "--output_dir", tmp_path / "bf16",
                     "--num_workers", "0", "--cache_dir", tmp_path / "hf_cache")
    assert abs(next(iter(result.value.values()))["nll"] - recorded["nll"]) > 1e-4  # what the run's autocast gives


def test_stage_two_keeps_the_stage_one_bias(lt_soups_run, idx_dir, tmp_path):
    """LOS's stage 2 loads the whole stage-1 state, fc bias included, and trains it (its SGD takes fc.parameters())."""
    out, _ = lt_soups_run
    stage1 = export_tensors(out / "final")["head.bias"]
    assert stage1.abs().max() > 1e-3
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, tmp_path / "stage2", "--method", "head", "--init_from",
                                                     out / "final", "--learning_rate", "1e-12", "--max_train_steps", "1",
                                                     "--eval_steps", "none", "--optimizer", "sgd", "--weight_decay", "0"))
    assert result.code == 0, result.err[-3000:]
    torch.testing.assert_close(export_tensors(tmp_path / "stage2" / "final")["head.bias"], stage1, rtol=0, atol=1e-7)
