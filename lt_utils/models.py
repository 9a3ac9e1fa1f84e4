"""Backbones (HF CLIP / SigLIP vision towers, ViT, DeiT, DINOv2, ResNets) and the LTModel wrapper: backbone feature
-> classifier head."""
import contextlib
import dataclasses
import os

import torch

from .errors import UserError, first_line
from .heads import build_head
from .hub_access import cache_if_unreachable
from .modeling_lt import FEATURE_WIDTHS, FEATURES, LTConfig, LTModel
from .registry import Registry
from .text_towers import ClipTextTower, SiglipTextTower

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# PIL resample codes, as stored in preprocessor_config.json.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclasses.dataclass(frozen=True)
class BackboneKind:
    """Everything model-family specific: a new backbone (SigLIP, DINOv2, ...) is one BACKBONES entry."""

    model_types: tuple  # config.model_type values this kind loads
    model_class: str  # transformers class of the vision tower
    vision_config: object  # full config -> the vision tower's config
    features: str  # a modeling_lt.FEATURES name: model output -> the [B, D] feature the head sees
    mean: list  # preprocessing when the checkpoint has no image processor
    std: list
    resample: int  # PIL code
    layer_wiring: tuple  # (second LayerNorm, MLP branch) attribute names of an encoder layer (AdaptFormer)
    lora_targets: tuple  # default LoRA targets: the first candidate whose names are Linear layers of the backbone
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    # transformer blocks (LIFT's methods): dotted paths of the block list (first present wins) and of each block's
    # parts by role (peft_modules.block_part); a role maps to candidates, the first present in the block wins
    block_lists: tuple = ()
    block_parts: dict = dataclasses.field(default_factory=dict)
    # vision config -> hidden_size, num_layers, image_size, patch_size (default: the ViT attribute names)
    geometry: object = None
    methods: tuple = None  # the --method names that apply (None: all)
    excluded_methods: tuple = ()  # ... but these
    eval_resize: float = 8 / 7  # the eval view: shorter side resized to image_size * this, then centre-cropped
    # image_size from the image processor's crop (DINOv2: its config holds the 518-px position grid it interpolates
    # from; its processor feeds 224-px crops); the config's when the checkpoint has no processor
    processor_image_size: bool = False
    # a CNN: any image size runs (no position grid), so --image_size may set it
    free_image_size: bool = False
    text_tower: object = None  # text_towers.TextTower of image-text models: --head_init text and --zero_shot
    # backbone parameters the forward never uses (DINOv2's masked-image-modelling token): never trained, else DDP
    # waits for their gradients
    unused_parameters: tuple = ()

    def load_class(self):
        import importlib

        module, _, name = self.model_class.rpartition(".")
        return getattr(importlib.import_module(module or "transformers"), name)

    def spec_geometry(self, vision_config):
        if self.geometry is not None:
            return self.geometry(vision_config)
        c = vision_config
        return {"hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "image_size": c.image_size,
                "patch_size": c.patch_size}


BACKBONES = Registry("backbone kind")
# CLIP / SigLIP encoder layers (same names)
_CLIP_BLOCK_PARTS = {"ln_1": ("layer_norm1",), "ln_2": ("layer_norm2",), "q": ("self_attn.q_proj",),
                     "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",), "attn_out": ("self_attn.out_proj",),
                     "mlp": ("mlp",), "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)}
# VPT's prompts assume one CLS token before the patches and a CLS-only feature
_NO_VPT = ("vpt_shallow", "vpt_deep")
BACKBONES.register("clip", BackboneKind(
    model_types=("clip", "clip_vision_model"), model_class="CLIPVisionModel",
    vision_config=lambda c: c.vision_config if c.model_type == "clip" else c,
    features="pooler_output",  # post-LayerNorm CLS, before the projection (LIFT)
    mean=CLIP_MEAN, std=CLIP_STD, resample=3, layer_wiring=(("layer_norm2", "mlp"),),
    lora_targets=(("q_proj", "v_proj"),),
    block_lists=("encoder.layers", "vision_model.encoder.layers"),
    block_parts=_CLIP_BLOCK_PARTS, text_tower=ClipTextTower()))
_VIT_BLOCK_PARTS = {"ln_1": ("layernorm_before",), "ln_2": ("layernorm_after",),
                    "q": ("attention.q_proj", "attention.attention.query"),
                    "k": ("attention.k_proj", "attention.attention.key"),
                    "v": ("attention.v_proj", "attention.attention.value"),
                    "attn_out": ("attention.o_proj", "attention.output.dense"), "mlp": ("mlp", "output.dense"),
                    "fc1": ("mlp.fc1", "intermediate.dense"), "fc2": ("mlp.fc2", "output.dense")}
BACKBONES.register("vit", BackboneKind(
    model_types=("vit",), model_class="ViTModel", vision_config=lambda c: c,
    features="cls_token",
    mean=[0.5] * 3, std=[0.5] * 3, resample=2,
    layer_wiring=(("layernorm_after", "mlp"), ("layernorm_after", "output")),  # transformers 5, 4.x
    lora_targets=(("q_proj", "v_proj"), ("query", "value")),
    # HF ViT's pooler is a tanh dense layer LIFT does not use; the feature is last_hidden_state[:, 0].
    model_kwargs={"add_pooling_layer": False},
    block_lists=("layers", "encoder.layer"),  # transformers 5, 4.x
    block_parts=_VIT_BLOCK_PARTS))
# DeiT: ViT's blocks; the feature is the CLS token, as DeiTForImageClassification's (the distillation token, a second
# token before the patches, is left out; VPT assumes one)
BACKBONES.register("deit", BackboneKind(
    model_types=("deit",), model_class="DeiTModel", vision_config=lambda c: c,
    features="cls_token",
    mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=3,
    layer_wiring=(("layernorm_after", "mlp"), ("layernorm_after", "output")),
    lora_targets=(("q_proj", "v_proj"), ("query", "value")), model_kwargs={"add_pooling_layer": False},
    block_lists=("layers", "encoder.layer"), block_parts=_VIT_BLOCK_PARTS, excluded_methods=_NO_VPT))
# SigLIP: the feature is the attention-pool head's output (SiglipModel.get_image_features), the embedding its text
# tower is aligned with, so a text-initialised head starts as the zero-shot classifier. (SiglipForImageClassification
# instead averages last_hidden_state and leaves the pool head unused; that mean is the feature of a checkpoint
# without the head, vision_use_head false.) No CLS token, so no VPT.
BACKBONES.register("siglip", BackboneKind(
    model_types=("siglip", "siglip_vision_model"), model_class="SiglipVisionModel",
    vision_config=lambda c: c.vision_config if c.model_type == "siglip" else c,
    features="pooler_or_token_mean",
    mean=[0.5] * 3, std=[0.5] * 3, resample=3, layer_wiring=(("layer_norm2", "mlp"),),
    lora_targets=(("q_proj", "v_proj"),), block_lists=("encoder.layers", "vision_model.encoder.layers"),
    block_parts=_CLIP_BLOCK_PARTS, excluded_methods=_NO_VPT, text_tower=SiglipTextTower(),
    eval_resize=1.0))  # no crop margin: its image processor resizes the whole image to the model's size
# DINOv2: feature = [CLS, mean of the patch tokens] after the final LayerNorm (2 D), as its model card's linear
# probe and Dinov2ForImageClassification. A block's residual branches are layer-scaled (h + ls2(mlp(norm2(h)))):
# AdaptFormer and the sequential adapter act on the whole scaled branch (layer_scale2), not inside it. VPT's prompts
# would enter the patch mean, so no VPT.
BACKBONES.register("dinov2", BackboneKind(
    model_types=("dinov2",), model_class="Dinov2Model", vision_config=lambda c: c,
    features="cls_patch_mean",
    mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=3, layer_wiring=(("norm2", "layer_scale2"),),
    lora_targets=(("q_proj", "v_proj"), ("query", "value")), block_lists=("encoder.layer",),
    block_parts={"ln_1": ("norm1",), "ln_2": ("norm2",), "q": ("attention.q_proj", "attention.attention.query"),
                 "k": ("attention.k_proj", "attention.attention.key"),
                 "v": ("attention.v_proj", "attention.attention.value"),
                 "attn_out": ("attention.o_proj", "attention.output.dense"), "mlp": ("layer_scale2",),
                 "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)},
    excluded_methods=_NO_VPT, processor_image_size=True, unused_parameters=("embeddings.mask_token",)))


# CNNs: BatchNorm, no transformer blocks, so none of LIFT's block methods; trained in full, by BitFit (BN shifts)
# or head-only
_CNN_METHODS = ("full_all", "bitfit_all", "head")
BACKBONES.register("cifar_resnet", BackboneKind(
    model_types=("cifar_resnet",), model_class="lt_utils.cifar_resnet.CifarResNetModel", vision_config=lambda c: c,
    features="pooler_output",  # global average pool
    mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010], resample=2,  # LOS's CIFAR normalisation
    layer_wiring=(), lora_targets=(), methods=_CNN_METHODS, free_image_size=True,
    eval_resize=1.0))  # CIFAR papers evaluate the 32-px image itself, not a crop
BACKBONES.register("resnet", BackboneKind(
    model_types=("resnet",), model_class="ResNetModel", vision_config=lambda c: c,
    features="pooler_flat",  # [B, D, 1, 1] average pool
    mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=3,
    layer_wiring=(), lora_targets=(), methods=_CNN_METHODS, free_image_size=True,
    # its config has no image size: the image processor's (microsoft/resnet-*: 224), else 224
    processor_image_size=True,
    geometry=lambda c: {"hidden_size": c.hidden_sizes[-1], "num_layers": sum(c.depths), "image_size": 224,
                        "patch_size": 32}))


def feature_dim(spec):
    """Width of the feature the head sees (DINOv2: CLS and patch mean side by side, 2 hidden_size)."""
    return spec.hidden_size * FEATURE_WIDTHS.get(BACKBONES.get(spec.kind).features, 1)


def backbone_kind_of(model_type):
    """The BACKBONES name that loads a config.model_type, or None."""
    return next((name for name in BACKBONES if model_type in BACKBONES.get(name).model_types), None)


@dataclasses.dataclass
class BackboneSpec:
    """Everything the rest of the code needs to know about a backbone (saved with exports)."""

    kind: str  # a BACKBONES name: "clip", "siglip", "vit", "deit", "dinov2", "resnet", "cifar_resnet"
    name_or_path: str
    hidden_size: int
    num_layers: int
    image_size: int
    patch_size: int
    image_mean: list
    image_std: list
    interpolation: str  # "bicubic" | "bilinear" (from the image processor's resample)
    eval_resize: int = None  # shorter side of the eval view before the centre crop (None: image_size * 8 // 7)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        unknown, missing = set(d) - names, names - set(d) - optional
        if unknown or missing:
            raise UserError(
                f"backbone spec has unknown keys {sorted(unknown)} / lacks {sorted(missing)}; "
                "re-export the model with this version"
            )
        return cls(**d)


def _remote_code_fix(err):
    return "; if you trust its code, pass --trust_remote_code" if "trust_remote_code" in str(err) else ""


def _is_local_path(name):
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def load_backbone_config(model_name_or_path, trust_remote_code=False):
    """(kind, full config, vision config) of a checkpoint; UserError for a missing path or an unsupported model.
    trust_remote_code: run the checkpoint's own config code (its auto_map), as transformers' flag of that name."""
    from transformers import AutoConfig

    from . import cifar_resnet  # noqa: F401  (registers model_type cifar_resnet with the auto classes)

    name = str(model_name_or_path)
    if _is_local_path(name) and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
        raise UserError(f"no config.json at {name!r}; pass a Hub id (e.g. openai/clip-vit-base-patch16) or a model dir")
    offline = None
    try:
        with cache_if_unreachable(name) as offline:  # transformers' own requests would retry for a minute
            config = AutoConfig.from_pretrained(os.path.expanduser(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if offline:
            raise UserError(f"cannot load the model {name!r}: the Hub cannot be reached ({offline}) and it is not in "
                            "the cache; pass a local model dir as --model_name_or_path, or run once with the Hub "
                            "reachable (the download is cached)") from None
        raise UserError(f"cannot load a model config from {name!r}: {first_line(err)}{_remote_code_fix(err)}") from err
    kind = backbone_kind_of(config.model_type)
    if kind is None:
        supported = sorted(t for name in BACKBONES for t in BACKBONES.get(name).model_types)
        raise UserError(f"{name!r} is a {config.model_type!r} model; supported model types: {supported}")
    return kind, config, BACKBONES.get(kind).vision_config(config)


def _preprocessing(model_name_or_path, kind, trust_remote_code=False):
    """Mean, std, interpolation and image size (None if unknown) from the checkpoint's image processor: its crop, or
    without one the size it resizes to (ResNets' shortest edge); the kind's defaults when it has none."""
    from transformers import AutoImageProcessor

    entry = BACKBONES.get(kind)
    default_mean, default_std, default_resample = entry.mean, entry.std, entry.resample
    try:
        processor = AutoImageProcessor.from_pretrained(os.path.expanduser(str(model_name_or_path)),
                                                       trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # no preprocessor_config.json in the dir or repo
        if _remote_code_fix(err):  # its own processor code, not run: the defaults would silently differ
            raise UserError(f"cannot load the image processor of {str(model_name_or_path)!r}: {first_line(err)}"
                            f"{_remote_code_fix(err)}") from err
        return default_mean, default_std, _RESAMPLE_NAMES[default_resample], None
    mean = [float(v) for v in (getattr(processor, "image_mean", None) or default_mean)]
    std = [float(v) for v in (getattr(processor, "image_std", None) or default_std)]
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    crop = _side(crop) or _side(getattr(processor, "size", None))
    return mean, std, _interpolation_name(getattr(processor, "resample", None), default_resample), crop


def _side(size):
    """An image processor's size as one side: its height, or its shortest edge."""
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return get("height") or get("shortest_edge")


def _interpolation_name(resample, default):
    if resample is None:
        resample = default
    value = getattr(resample, "value", resample)  # PIL enum, int, or torchvision InterpolationMode
    if isinstance(value, str):
        return value.lower()
    return _RESAMPLE_NAMES.get(int(value), _RESAMPLE_NAMES[default])


def load_backbone(model_name_or_path, from_scratch=False, seed=0, image_size=None, trust_remote_code=False):
    """The vision backbone (fp32) and its spec. `from_scratch`: seeded random init from the config alone.
    `image_size`: a CNN's input size instead of the checkpoint's (--image_size). `trust_remote_code`: the
    checkpoint's config and image processor may run their own code."""
    kind, _, vision_config = load_backbone_config(model_name_or_path, trust_remote_code)
    if image_size is not None and not BACKBONES.get(kind).free_image_size:
        free = ", ".join(name for name in BACKBONES if BACKBONES.get(name).free_image_size)
        raise UserError(f"--image_size {image_size} applies to CNN backbones ({free}); a {kind} backbone's size is "
                        "its checkpoint's (position embeddings): drop the flag")
    cls, kwargs = BACKBONES.get(kind).load_class(), BACKBONES.get(kind).model_kwargs
    with cache_if_unreachable(model_name_or_path):  # the weights and the processor: cached with the config
        if from_scratch:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                backbone = cls(vision_config, **kwargs)
        else:
            backbone = _from_pretrained(cls, model_name_or_path, kwargs)
        return backbone, backbone_spec(model_name_or_path, kind, vision_config, image_size, trust_remote_code)


def backbone_spec(model_name_or_path, kind, vision_config, image_size=None, trust_remote_code=False):
    """The BackboneSpec of a checkpoint: geometry from its vision config, preprocessing from its image processor;
    `image_size` (a CNN's) replaces the image size of both."""
    mean, std, interpolation, crop = _preprocessing(model_name_or_path, kind, trust_remote_code)
    geometry = {k: int(v) for k, v in BACKBONES.get(kind).spec_geometry(vision_config).items()}
    if BACKBONES.get(kind).processor_image_size and crop:
        geometry["image_size"] = int(crop)
    if image_size is not None:
        geometry["image_size"] = int(image_size)
    return BackboneSpec(kind=kind, name_or_path=str(model_name_or_path), image_mean=mean, image_std=std,
                        interpolation=interpolation, **geometry,
                        eval_resize=int(geometry["image_size"] * BACKBONES.get(kind).eval_resize))


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _from_pretrained(cls, model_name_or_path, kwargs):
    name = os.path.expanduser(str(model_name_or_path))
    try:
        # The load report lists a full CLIP checkpoint's text tower as unexpected (expected here);
        # missing keys, the real problem, are checked below.
        with _quiet_transformers():
            backbone, info = cls.from_pretrained(name, dtype=torch.float32, output_loading_info=True, **kwargs)
    except OSError as err:
        raise UserError(
            f"cannot load weights from {name!r} ({first_line(err)}); pass --from_scratch for a config-only dir"
        ) from err
    missing = list(info.get("missing_keys", []))
    if missing:
        # Silently random weights would look like a bad run; fail instead.
        example = sorted(missing)[0]
        raise UserError(f"{name!r} lacks {len(missing)} backbone weights (e.g. {example}); wrong checkpoint?")
    return backbone


def enable_gradient_checkpointing(lt_model):
    """The HF backbone's own activation checkpointing; non-reentrant, so frozen inputs (LoRA, adapters) still get
    gradients, and AdaptFormer's layer hooks run again in the recomputation."""
    lt_model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return lt_model


def build_lt_model(model_name_or_path, num_classes, head_type="cosine", head_scale=25.0, from_scratch=False, seed=0,
                   image_size=None, trust_remote_code=False):
    """Backbone + a seeded random head; data-dependent head inits are applied by head_init.set_head_weight."""
    if int(num_classes) < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    backbone, spec = load_backbone(model_name_or_path, from_scratch=from_scratch, seed=seed, image_size=image_size,
                                   trust_remote_code=trust_remote_code)
    head = build_head(head_type, int(num_classes), feature_dim(spec), scale=head_scale, seed=seed)
    return LTModel(backbone, head, spec, feature=BACKBONES.get(spec.kind).features)


def unwrap_lt_model(model):
    """The LTModel inside accelerate/DDP/DeepSpeed (`.module`), peft (`get_base_model`) or torch.compile wrappers."""
    for _ in range(16):
        if isinstance(model, LTModel):
            return model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            break
    raise TypeError(f"no LTModel inside {type(model).__name__}")


def lt_config(lt_model, class_names, head_type, head_scale, head_init, lt_info, base_model, from_scratch, seed, method, run,
              soup=None):
    """The LTConfig of an LTModel: everything that rebuilds it (`modeling_lt.lt_model_from_config`) and the record the
    project reads back. lt_info: the split's LTInfo as a dict (its class names are the labels, stored once); method: the
    recorded method config (lt_utils.methods, MethodConfig.to_record, with "base" after --init_from)."""
    kind = BACKBONES.get(lt_model.spec.kind)
    if kind.features not in FEATURES:
        raise UserError(f"backbone kind {lt_model.spec.kind!r} names feature {kind.features!r}, not one of "
                        f"{sorted(FEATURES)}; add it to modeling_lt.FEATURES")
    return LTConfig(
        backbone_class=type(lt_model.backbone).__name__, backbone_model_config=lt_model.backbone.config.to_dict(),
        backbone_model_kwargs=dict(kind.model_kwargs), feature=kind.features, head_type=head_type,
        head_scale=float(head_scale), layer_wiring=[list(w) for w in kind.layer_wiring],
        block_lists=list(kind.block_lists), block_parts={r: list(c) for r, c in kind.block_parts.items()},
        num_labels=len(class_names), id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)}, backbone_spec=lt_model.spec.to_dict(),
        base_model=str(base_model), from_scratch=bool(from_scratch), seed=int(seed), method=dict(method),
        head_init=dict(head_init), lt_info={k: v for k, v in dict(lt_info).items() if k != "class_names"},
        run=dict(run), soup=soup)
