"""Throughput: training steps (per method, fp32/bf16, eager/compiled), the training loader against a LIFT-style one,
five-crop evaluation, head-only caching, gradient checkpointing memory, achieved FLOP/s against a matmul peak.

  python benchmarks/bench_throughput.py                    # CPU: CLIP ViT-B/16 widths at 224 px, 2 of its 12 layers
  python benchmarks/bench_throughput.py --device cuda      # a GPU: all 12 layers, larger batches
  python benchmarks/bench_throughput.py --quick            # seconds: a tiny CLIP, for smoke tests

Every section measures a candidate and its baseline in the same run, alternating which goes first, and reports the
ratio per repeat with its median and spread (min-max); absolute numbers on a shared machine drift, ratios much less.

train     one optimizer step (forward, logit-adjusted loss, backward, SGD step) of the LTModel each `--method`
          trains, random init, random 224 px batches; eager vs torch.compile with the kwargs of accelerate's
          TorchDynamoPlugin (what `--torch_compile` runs); fp32 vs bf16 autocast. FLOPs per image counted once with
          torch's FlopCounterMode; achieved FLOP/s against a square matmul timed in the same repeat.
loader    images/s of one loader process (num_workers 0, one thread: the work of one DataLoader worker) over a
          CIFAR-100-LT split of synthetic 32 px images: the project's `data_loaders.image_loader` + `SeededAugment`
          (decoded once to uint8, per-sample generator) vs a LIFT-equivalent torchvision pipeline (in-memory uint8
          arrays as torchvision's CIFAR100 holds them, PIL RandomResizedCrop(224) + flip + ToTensor + Normalize) vs the
          project's previous path (PNG decode per read, PIL bicubic, fork_rng + manual_seed per sample); and
          --augment_on_device: the loader drawing boxes only, and that loader plus the crop/resize on --device.
eval      `engine.predict` over the test split: one centre view vs five-crop TTE (`--tte fivecrop`), loader included.
head      head-only training (--method head) over N epochs: cached features vs the frozen backbone every epoch
          (bench_head_cache.py's two paths, on this backbone).
memory    ViT-B/16 full fine-tuning at batch 32 (all 12 layers): activation memory with and without
          --gradient_checkpointing. CUDA: max_memory_allocated above the weights. CPU: under FakeTensorMode (no
          compute), bytes autograd saves in the forward (+ one layer's recomputation, for checkpointing).
budget    ViT-L/14@336: AdaptFormer at batch 128 and full fine-tuning under ZeRO-2, activations counted as in
          `memory` plus weights and optimizer states: GiB per GPU with and without checkpointing.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import REPO, clock, median, set_threads, write_results

sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of predict / cache_features would bury the numbers

METHODS = ("adaptformer", "lora", "bitfit", "full")
SECTIONS = ("train", "loader", "eval", "head", "memory", "budget")
# library kernels torch.compile calls rather than generates (matched in profiler op names; "other" is the rest)
OP_KINDS = {"gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "gemm", "Gemm"),
            "attention": ("scaled_dot_product", "attention", "flash", "fmha"),
            "convolution": ("convolution", "conv2d", "cudnn", "Conv")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true",
                   help="a tiny CLIP at 32 px and few images: a smoke test, not numbers")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats per section (ratios: median, min-max)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default: 12 on cuda, 2 on cpu)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile_methods", default=None, help="methods also timed compiled (default: all; on this CPU "
                   "each compilation takes about a minute the first time, seconds once inductor's cache holds it)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--train_batch", type=int, default=None, help="default 16 (cpu, the shape LIFT-side comparisons used) / 64 (cuda)")
    p.add_argument("--train_steps", type=int, default=None, help="timed steps per repeat (default 2 cpu / 20 cuda)")
    p.add_argument("--loader_images", type=int, default=384, help="images per loader timing")
    p.add_argument("--loader_batch", type=int, default=16)
    p.add_argument("--eval_images", type=int, default=None, help="default 16 (cpu) / 512 (cuda)")
    p.add_argument("--head_images", type=int, default=None, help="default 8 (cpu) / 1024 (cuda)")
    p.add_argument("--head_epochs", type=int, default=10)
    p.add_argument("--memory_batch", type=int, default=32)
    p.add_argument("--budget_peft_batch", type=int, default=128, help="budget: AdaptFormer batch (LIFT: 128)")
    p.add_argument("--budget_full_batch", type=int, default=16, help="budget: full fine-tuning batch per GPU")
    p.add_argument("--budget_gpus", type=int, default=8, help="budget: GPUs sharing ZeRO-2's states")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=None, help="results dir (default benchmarks/results)")
    p.add_argument("--results_name", default="throughput")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    defaults = dict(layers=12 if cuda else 2, train_batch=64 if cuda else 16, train_steps=20 if cuda else 2,
                    eval_images=512 if cuda else 16, head_images=1024 if cuda else 8, compile_methods=",".join(METHODS))
    if args.quick:
        defaults.update(layers=2, train_batch=2, train_steps=1, eval_images=4, head_images=4,
                        compile_methods="adaptformer")
        args.loader_images, args.loader_batch, args.memory_batch, args.head_epochs = 32, 8, 2, 3
        args.budget_peft_batch, args.budget_full_batch = 2, 2
        args.compile_backend = "aot_eager" if args.compile_backend == "inductor" else args.compile_backend
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sections = [s for s in args.sections.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.compile_methods = [m for m in args.compile_methods.split(",") if m in args.methods]
    unknown = sorted(set(args.sections) - set(SECTIONS)) + sorted(set(args.methods) - set(METHODS))
    if unknown or not set(args.precisions) <= {"fp32", "bf16"}:
        p.error(f"unknown sections/methods/precisions {unknown or args.precisions}")
    return args


# ------------------------------------------------------------------------------------------------------ helpers
def spread(values):
    return {"median": median(values), "min": min(values), "max": max(values), "runs": list(values)}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def model_dir(args, root, layers=None):
    """A config-only CLIP vision dir: ViT-B/16 shapes (or a tiny CLIP with --quick)."""
    from helpers_models import VIT_B16_SHAPES

    shapes = dict(VIT_B16_SHAPES, num_hidden_layers=layers or args.layers, projection_dim=512)
    if args.quick:
        shapes.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=32, patch_size=8)
    return config_dir(root, shapes)


def build_model(path, method, classes, seed, device):
    from lt_utils.models import build_lt_model
    from lt_utils.peft_methods import apply_method

    lt = build_lt_model(path, classes, head_type="cosine", from_scratch=True, seed=seed)
    return apply_method(lt, method).to(device), lt


def autocast(precision, device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def matmul_flops(device, precision, quick):
    """FLOP/s of a square matmul (the peak a ViT step can hope for on this device and dtype)."""
    n = 256 if quick else (8192 if str(device).startswith("cuda") else 1024)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, start = 0, clock()
    while reps < 3 or clock() - start < 0.5:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (clock() - start)


# ------------------------------------------------------------------------------------------------------- train
class TrainStep:
    """One method x precision x (eager | compiled) training step on a fixed random batch."""

    def __init__(self, args, path, method, precision, compiled):
        from lt_utils.compile import dynamo_plugin
        from lt_utils.losses import build_loss
        from lt_utils.spec import CompileSpec

        self.device, self.precision, self.compiled = args.device, precision, compiled
        model, self.lt = build_model(path, method, args.classes, args.seed, args.device)
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        if compiled:  # the kwargs accelerate's TorchDynamoPlugin passes to torch.compile under --torch_compile
            plugin = dynamo_plugin(CompileSpec(torch_compile=True, torch_compile_backend=args.compile_backend))
            model = torch.compile(model, **plugin.to_kwargs())
        self.model = model.train()
        counts = [max(1, int(500 * 0.01 ** (i / max(1, args.classes - 1)))) for i in range(args.classes)]
        self.loss_fn = build_loss("la", counts).to(args.device)
        g = torch.Generator().manual_seed(args.seed)
        size = self.lt.spec.image_size
        self.pixels = torch.randn(args.train_batch, 3, size, size, generator=g).to(args.device)
        self.labels = torch.randint(0, args.classes, (args.train_batch,), generator=g).to(args.device)

    def step(self):
        with autocast(self.precision, self.device):
            logits = self.model(self.pixels)
        loss = self.loss_fn(logits.float(), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def seconds(self, steps):
        sync(self.device)
        start = clock()
        for _ in range(steps):
            loss = self.step()
        loss.item()
        sync(self.device)
        return clock() - start

    def op_shares(self):
        """Self time of one profiled step by op kind: the share of GEMMs, attention and convolutions bounds what
        compilation can gain (it fuses the element-wise rest; these kernels stay library calls)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = str(self.device).startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            self.seconds(1)
        shares = {kind: 0.0 for kind in (*OP_KINDS, "other")}
        for event in prof.key_averages():
            t = event.self_device_time_total if cuda else event.self_cpu_time_total
            kind = next((k for k, names in OP_KINDS.items() if any(n in event.key for n in names)), "other")
            shares[kind] += t
        total = sum(shares.values())
        return {kind: t / total for kind, t in shares.items()}

    def flops_per_image(self):
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return counter.get_total_flops() / len(self.labels)


def bench_train(args, root):
    path = model_dir(args, root)
    configs = [(m, p, c) for m in args.methods for p in args.precisions
               for c in ((False, True) if m in args.compile_methods else (False,))]
    steps, warmup_s, flops, shares = {}, {}, {}, {}
    for method, precision, compiled in configs:
        key = f"{method}/{precision}/{'compiled' if compiled else 'eager'}"
        step = TrainStep(args, path, method, precision, compiled)
        start = clock()
        step.seconds(2 if compiled else 1)  # compilation (and recompilation for the first optimizer state) / warm-up
        warmup_s[key] = clock() - start
        if not compiled and precision == args.precisions[0]:
            flops[method] = step.flops_per_image()
        if not compiled:
            shares[key] = step.op_shares()
        steps[key] = step
        print(f"  built {key}: warm-up {warmup_s[key]:.1f}s", flush=True)
    runs = []
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        run = {"images_per_s": {}, "matmul_flops": {}}
        for precision in args.precisions:
            run["matmul_flops"][precision] = matmul_flops(args.device, precision, args.quick)
        for key in order:
            run["images_per_s"][key] = args.train_batch * args.train_steps / steps[key].seconds(args.train_steps)
        runs.append(run)
        print(f"  train repeat {repeat + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in run["images_per_s"].items()),
              flush=True)
    ratios = {}
    for method, precision, compiled in configs:
        eager = f"{method}/{precision}/eager"
        if compiled:
            ratios[f"{method}/{precision}: compiled / eager"] = spread(
                [r["images_per_s"][f"{method}/{precision}/compiled"] / r["images_per_s"][eager] for r in runs])
        elif precision != "fp32" and "fp32" in args.precisions:
            ratios[f"{method}: bf16 / fp32 (eager)"] = spread(
                [r["images_per_s"][eager] / r["images_per_s"][f"{method}/fp32/eager"] for r in runs])
    utilisation = {}
    for key in steps:
        method, precision, _ = key.split("/")
        if method in flops:
            utilisation[key] = spread([r["images_per_s"][key] * flops[method] / r["matmul_flops"][precision]
                                       for r in runs])
    # Amdahl: if compilation made every op but the library kernels free, compiled / eager would be 1 / their share
    bound = {key.rsplit("/", 1)[0]: 1.0 / (s["gemm"] + s["attention"] + s["convolution"]) for key, s in shares.items()}
    return {"batch": args.train_batch, "steps": args.train_steps, "layers": args.layers, "warmup_s": warmup_s,
            "flops_per_image": flops, "ratios": ratios, "eager_op_shares": shares, "compile_bound": bound, "fraction_of_matmul_peak": utilisation,
            "images_per_s": {k: spread([r["images_per_s"][k] for r in runs]) for k in steps},
            "matmul_flops": {p: spread([r["matmul_flops"][p] for r in runs]) for p in args.precisions}, "repeats": runs}


# ------------------------------------------------------------------------------------------------------ loader
def write_synthetic_cifar100(root, per_class_train, per_class_test, seed=0):
    """The original cifar-100-python layout, filled with smooth synthetic 32 px images (compressible like photos)."""
    import pickle

    rng = np.random.default_rng(seed)
    root = Path(root) / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per_class)
        coarse = rng.integers(0, 256, (len(labels), 3, 4, 4)).astype(np.float32)
        images = np.kron(coarse, np.ones((1, 1, 8, 8), np.float32)) + rng.normal(0, 8, (len(labels), 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), -1)
        with open(root / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class_{i}".encode() for i in range(100)]}, f)
    return root.parent


def load_cifar_lt(args, root):
    from lt_utils.data import load_lt_dataset

    per_class = 24 if args.quick else 120
    data_dir = write_synthetic_cifar100(Path(root) / "cifar_src", per_class, 4 if args.quick else 10, args.seed)
    return load_lt_dataset("cifar100_lt", imb=4 if args.quick else 100, data_dir=data_dir, max_per_class=per_class - 20,
                           cache_dir=Path(root) / "hf_cache")


class LiftStyleCifar(torch.utils.data.Dataset):
    """torchvision CIFAR100's __getitem__: a uint8 array row -> PIL image -> transform (global RNG)."""

    def __init__(self, array, labels, transform):
        self.array, self.labels, self.transform = array, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.array[i])), int(self.labels[i])


class PreviousSeededAugment:
    """The project's previous training path: PNG decode on read, PIL resize, fork_rng + manual_seed per sample."""

    def __init__(self, transform, seed):
        self.transform, self.seed = transform, seed

    def __call__(self, batch):
        out = []
        for image, sample_id in zip(batch["image"], batch["sample_id"]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 * 100_000_007 + sample_id) % (2**62))
                out.append(self.transform(image))
        return {"pixel_values": out, "labels": [int(label) for label in batch["label"]]}


def previous_train_transform(size, mean, std):
    from torchvision.transforms import v2

    return v2.Compose([v2.Lambda(lambda im: im.convert("RGB")),
                       v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std), v2.ToPureTensor()])


def bench_loader(args, root, ds):
    import torchvision.transforms as tv
    from torch.utils.data import DataLoader

    from lt_utils import data_loaders as T
    from lt_utils.data import images as data_images
    from lt_utils.models import CLIP_MEAN, CLIP_STD
    from lt_utils.transforms import SeededAugment, collate

    train = ds["train"]
    size = 32 if args.quick else 224
    spec = argparse.Namespace(image_size=size, image_mean=CLIP_MEAN, image_std=CLIP_STD, interpolation="bicubic")
    data_images._DECODED.clear()
    start = clock()
    array = data_images.decoded_array(train)  # the one-time decode the project's loader does per process
    decode_s = clock() - start
    labels = np.asarray(train["label"])
    lift_tf = tv.Compose([tv.RandomResizedCrop(size), tv.RandomHorizontalFlip(), tv.ToTensor(),
                          tv.Normalize(CLIP_MEAN, CLIP_STD)])
    train_tf = T.image_transforms(spec)[0]
    augment = SeededAugment(train_tf, args.seed)
    boxes_tf, on_device = T.on_device_augment(True, train_tf)
    boxes = SeededAugment(boxes_tf, args.seed)
    loaders = {
        "project": T.image_loader(train, augment, args.loader_batch, 0, shuffle=True),
        # --augment_on_device: the loader draws boxes only; "+ device step" also crops and resizes on args.device
        "on_device_loader": T.image_loader(train, boxes, args.loader_batch, 0, shuffle=True),
        "on_device_loader + device step": T.image_loader(train, boxes, args.loader_batch, 0, shuffle=True),
        "lift_style": DataLoader(LiftStyleCifar(array, labels, lift_tf), batch_size=args.loader_batch, shuffle=True),
        "previous": DataLoader(train.add_column("sample_id", list(range(len(train)))).with_transform(
            PreviousSeededAugment(previous_train_transform(size, CLIP_MEAN, CLIP_STD), args.seed)),
            batch_size=args.loader_batch, shuffle=True, collate_fn=collate),
    }

    def images_per_s(name):
        seen, start = 0, clock()
        while seen < args.loader_images:
            for batch in loaders[name]:
                pixels = batch["pixel_values"] if isinstance(batch, dict) else batch[0]
                if name.endswith("device step"):
                    pixels = on_device({k: v.to(args.device) for k, v in batch.items()})
                    sync(args.device)
                seen += len(pixels)
                if seen >= args.loader_images:
                    break
        return seen / (clock() - start)

    for name in loaders:  # warm-up: first-touch and import costs
        next(iter(loaders[name]))
    runs = []
    for repeat in range(args.repeats):
        order = list(loaders) if repeat % 2 == 0 else list(reversed(loaders))
        augment.epoch = boxes.epoch = repeat
        runs.append({name: images_per_s(name) for name in order})
        print(f"  loader repeat {repeat + 1}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in runs[-1].items()),
              flush=True)
    return {"train_images": len(train), "image_size": size, "batch": args.loader_batch,
            "images_per_timing": args.loader_images,
            "decode_once_s": decode_s, "decoded_bytes": int(array.nbytes),
            "images_per_s": {k: spread([r[k] for r in runs]) for k in loaders},
            "ratios": {"project / lift_style": spread([r["project"] / r["lift_style"] for r in runs]),
                       "project / previous": spread([r["project"] / r["previous"] for r in runs]),
                       "on_device_loader / lift_style": spread([r["on_device_loader"] / r["lift_style"] for r in runs]),
                       "on_device_loader + device step / project": spread(
                           [r["on_device_loader + device step"] / r["project"] for r in runs])},
            "repeats": runs}


# -------------------------------------------------------------------------------------------------------- eval
def bench_eval(args, root, ds, accelerator):
    from lt_utils import data_loaders as T
    from lt_utils.engine import predict
    from lt_utils.spec import DataSpec

    path = model_dir(args, root)
    _, lt = build_model(path, "adaptformer", args.classes, args.seed, accelerator.device)
    lt.eval()
    test = ds["test"].select(range(min(args.eval_images, len(ds["test"]))))
    loaders = {tte: accelerator.prepare(T.image_loader(test, T.test_transform(lt.spec, DataSpec(tte=tte)),
                                                          args.eval_images, 0))
               for tte in ("none", "fivecrop")}
    predict(lt, loaders["none"], accelerator)  # warm-up

    def seconds(tte):
        sync(accelerator.device)
        start = clock()
        predict(lt, loaders[tte], accelerator)
        sync(accelerator.device)
        return clock() - start

    runs = []
    for repeat in range(args.repeats):
        order = ("none", "fivecrop") if repeat % 2 == 0 else ("fivecrop", "none")
        runs.append({tte: seconds(tte) for tte in order})
        print(f"  eval repeat {repeat + 1}: one view {runs[-1]['none']:.2f}s, five-crop {runs[-1]['fivecrop']:.2f}s",
              flush=True)
    return {"images": len(test), "layers": args.layers,
            "seconds": {k: spread([r[k] for r in runs]) for k in ("none", "fivecrop")},
            "ratios": {"fivecrop / one view (time)": spread([r["fivecrop"] / r["none"] for r in runs])},
            "repeats": runs}


# -------------------------------------------------------------------------------------------------------- head
def bench_head(args, root, ds, accelerator):
    import bench_head_cache as H

    from lt_utils import data_loaders as T
    from lt_utils.heads import random_head_init
    from lt_utils.losses import build_loss
    from lt_utils.peft_methods import apply_method

    path = model_dir(args, root)
    _, lt = build_model(path, "head", args.classes, args.seed, accelerator.device)
    apply_method(lt, "head")
    head_init = random_head_init(args.classes, lt.spec.hidden_size, seed=args.seed)
    train = ds["train"].shuffle(seed=args.seed).select(range(min(args.head_images, len(ds["train"]))))
    train_tf, eval_tf = T.image_transforms(lt.spec, augment="rrc_flip")
    train_tf = T.SeededAugment(train_tf, args.seed)  # --head_features augmented: what train_lt.py feeds the backbone
    loss_fn = build_loss("la", [500] * args.classes).to(accelerator.device)
    hargs = argparse.Namespace(per_device_eval_batch_size=64, per_device_train_batch_size=min(32, len(train)),
                               learning_rate=1e-3, seed=args.seed)
    runs = []
    for repeat in range(args.repeats):
        run = H.one_repeat(hargs, accelerator, lt, head_init, train, eval_tf, loss_fn, [args.head_epochs],
                           naive_first=repeat % 2 == 0, train_tf=train_tf)[str(args.head_epochs)]
        runs.append(run)
        print(f"  head repeat {repeat + 1}: naive {run['naive_s']:.2f}s, augmented {run['augmented_s']:.2f}s, "
              f"cached {run['cached_s']:.2f}s", flush=True)
    return {"images": len(train), "epochs": args.head_epochs, "layers": args.layers,
            "ratios": {f"naive / cached over {args.head_epochs} epochs":
                       spread([r["naive_s"] / r["cached_s"] for r in runs]),
                       f"augmented / cached over {args.head_epochs} epochs":
                       spread([r["augmented_s"] / r["cached_s"] for r in runs]),
                       f"augmented / naive over {args.head_epochs} epochs":
                       spread([r["augmented_s"] / r["naive_s"] for r in runs])},
            "max_abs_head_diff": max(r["max_abs_head_diff"] for r in runs), "repeats": runs}


# ------------------------------------------------------------------------------------------------------ memory
def activation_bytes(args, root, checkpointing, shapes=None, method="full", batch=None, half=False):
    """(activation bytes, how measured) of one training step at `batch` (default --memory_batch) of a CLIP vision
    model of `shapes` (default ViT-B/16, 12 layers) trained with `method`. CUDA: max_memory_allocated above the
    weights. CPU: the bytes autograd saves for the backward in the forward, counted under FakeTensorMode (CPU
    kernels' shapes, no compute; the meta device would take SDPA's math path and count T x T attention maps that no
    real kernel keeps); `half`: a 16-bit model (the lower end of what autocast saves)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lt_utils.models import enable_gradient_checkpointing

    cuda = str(args.device).startswith("cuda")
    path = model_dir(args, root, layers=12) if shapes is None else config_dir(root, shapes)
    model, lt = build_model(path, method, args.classes, args.seed, args.device if cuda else "cpu")
    if half:
        model.half()
    if checkpointing:
        enable_gradient_checkpointing(lt)
    model.train()
    size, batch = lt.spec.image_size, batch or args.memory_batch
    dtype = torch.float16 if half else torch.float32
    if cuda:
        pixels = torch.randn(batch, 3, size, size, device=args.device, dtype=dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(pixels).float().sum().backward()
        torch.cuda.synchronize()
        how = "cuda max_memory_allocated above weights and batch (gradients included)"
        return torch.cuda.max_memory_allocated() - base, how
    saved = {"forward": 0}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if not (base.is_leaf and base.requires_grad):  # weights are not activations
            saved["forward"] += tensor.numel() * tensor.element_size()
        return tensor

    with FakeTensorMode(allow_non_fake_inputs=True):
        pixels = torch.randn(batch, 3, size, size, dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(pixels)
    return saved["forward"], "FakeTensorMode (CPU kernels): bytes saved for backward in the forward"


def config_dir(root, shapes):
    """A config-only CLIP vision dir of `shapes` (CLIPVisionConfig keyword arguments), written once per run."""
    from helpers_models import write_config_only
    from transformers import CLIPVisionConfig

    path = Path(root) / ("clip_" + "_".join(f"{k}{v}" for k, v in sorted(shapes.items())))
    if not path.is_dir():
        write_config_only(path, CLIPVisionConfig(**shapes))
    return path


def bench_memory(args, root):
    runs = []
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        got = {ckpt: activation_bytes(args, root, ckpt) for ckpt in order}
        plain, how = got[False]
        ckpt = got[True][0]
        if not str(args.device).startswith("cuda"):
            # checkpointing recomputes one layer at a time in the backward: add one layer's worth of activations
            ckpt += plain / 12
        runs.append({"plain_bytes": plain, "checkpointed_bytes": ckpt})
        print(f"  memory repeat {repeat + 1}: {plain / 2**20:.0f} MiB -> {ckpt / 2**20:.0f} MiB", flush=True)
    return {"batch": args.memory_batch, "layers": 12, "method": "full", "measured_as": how,
            "plain_mib": median([r["plain_bytes"] for r in runs]) / 2**20,
            "checkpointed_mib": median([r["checkpointed_bytes"] for r in runs]) / 2**20,
            "ratios": {"checkpointed / plain (activation memory)":
                       spread([r["checkpointed_bytes"] / r["plain_bytes"] for r in runs])},
            "repeats": runs}


VIT_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)


def bench_budget(args, root):
    """Does ViT-L/14@336 (LIFT's largest CLIP) train on one 20 GB GPU? Activations counted as in `memory` (one
    repeat: the count is deterministic), plus weights and optimizer states by formula. AdaptFormer at LIFT's batch
    128 (SGD); full fine-tuning at --budget_full_batch per GPU under ZeRO-2 on --budget_gpus GPUs (AdamW)."""
    shapes = dict(VIT_L14_336)
    if args.quick:
        shapes.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                      patch_size=8)
    layers, gib = shapes["num_hidden_layers"], 2**30
    rows = {}
    for method, batch in (("adaptformer", args.budget_peft_batch), ("full", args.budget_full_batch)):
        model, _ = build_model(config_dir(root, shapes), method, args.classes, args.seed, "cpu")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        del model
        for half in (False, True):
            try:
                plain = activation_bytes(args, root, False, shapes, method, batch, half)[0]
            except torch.cuda.OutOfMemoryError:  # on a GPU the plain run may not fit: that is the finding
                plain = float("nan")
                torch.cuda.empty_cache()
            kept = activation_bytes(args, root, True, shapes, method, batch, half)[0]
            # weights + trainable parameters' gradients and optimizer states (bytes per parameter)
            if method == "full":  # ZeRO-2, mixed-precision AdamW: 16-bit weights, 16-bit grads, fp32 master + m + v sharded
                static = 2 * total + (2 + 12) * total / args.budget_gpus
            else:  # one GPU: weights as trained (fp32 under autocast, or 16-bit), fp32 trainable + grad + SGD momentum
                static = (2 if half else 4) * total + 12 * trainable
            # counted on CPU: + one layer recomputed at a time in the backward (a GPU's peak includes it)
            ckpt = kept if str(args.device).startswith("cuda") else kept + plain / layers
            rows[f"{method}/batch {batch}/{'16-bit' if half else 'fp32'}"] = {
                "parameters": total, "trainable": trainable, "activations_gib": plain / gib,
                "activations_checkpointed_gib": ckpt / gib, "static_gib": static / gib,
                "total_gib": (static + plain) / gib, "total_checkpointed_gib": (static + ckpt) / gib}
            print(f"  budget {method} batch {batch} {'16-bit' if half else 'fp32'}: activations {plain / gib:.1f} GiB "
                  f"-> {ckpt / gib:.1f} GiB checkpointed, + {static / gib:.1f} GiB weights/states", flush=True)
    return {"shapes": shapes, "gpus_zero2": args.budget_gpus, "rows": rows}


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    results, start = {}, clock()
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as root:
        accelerator = Accelerator(cpu=not str(args.device).startswith("cuda"),
                                  dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        ds = None
        if {"loader", "eval", "head"} & set(args.sections):
            ds, _ = load_cifar_lt(args, root)
        for section in args.sections:
            print(f"[{section}]", flush=True)
            t0 = clock()
            if section == "train":
                results["train"] = bench_train(args, root)
            elif section == "loader":
                results["loader"] = bench_loader(args, root, ds)
            elif section == "eval":
                results["eval"] = bench_eval(args, root, ds, accelerator)
            elif section == "head":
                results["head"] = bench_head(args, root, ds, accelerator)
            elif section == "memory":
                results["memory"] = bench_memory(args, root)
            elif section == "budget":
                results["budget"] = bench_budget(args, root)
            results[section]["section_seconds"] = clock() - t0
    setup = {k: v for k, v in vars(args).items() if k not in ("out_dir",)}
    path = write_results(args.results_name, {"setup": setup, "total_seconds": clock() - start, **results},
                         out_dir=args.out_dir)
    print(summary_table(results))
    print(f"wrote {path} ({clock() - start:.0f}s)")
    return results


def summary_table(results):
    lines = ["| section | ratio | median | min - max |", "|---|---|---:|---|"]
    for section, payload in results.items():
        for name, s in payload.get("ratios", {}).items():
            lines.append(f"| {section} | {name} | {s['median']:.2f} | {s['min']:.2f} - {s['max']:.2f} |")
    for key, row in results.get("budget", {}).get("rows", {}).items():
        lines.append(f"| budget | ViT-L/14@336 {key}: GiB per GPU, checkpointed (plain) | "
                     f"{row['total_checkpointed_gib']:.1f} | ({row['total_gib']:.1f}) |")
    for key, bound in results.get("train", {}).get("compile_bound", {}).items():
        lines.append(f"| train | {key}: compiled / eager bound (1 / GEMM+attention+conv share of eager) | {bound:.2f} | |")
    util = results.get("train", {}).get("fraction_of_matmul_peak", {})
    for key, s in util.items():
        lines.append(f"| train | {key}: achieved FLOP/s / matmul peak | {s['median']:.2f} | "
                     f"{s['min']:.2f} - {s['max']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
