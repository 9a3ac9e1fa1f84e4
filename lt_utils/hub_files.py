"""The Hub-native files of an export dir, so it works with transformers / peft alone (no lt_utils):

* config.json + model.safetensors + modeling_lt.py (and the files it imports): LTForImageClassification as remote
  code, the whole model with LoRA merged in (`AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True)`);
* preprocessor_config.json: the evaluation preprocessing (shorter side to the spec's eval_resize, by default 8/7 of
  the resolution; centre crop, the interpolation, mean/std), pixel for pixel what transforms.build_eval_transform
  computes;
* LoRA runs: adapter/ (adapter_config.json + adapter_model.safetensors), a standard peft adapter of the plain base
  backbone (`PeftModel.from_pretrained(AutoModel.from_pretrained(base), d, subfolder="adapter")`), and
  adapter/head.safetensors, the head for its feature. A subfolder, because transformers loads a top-level
  adapter_config.json onto the full model it finds beside it (where LoRA is already merged).
"""
import contextlib
import re
from pathlib import Path

from safetensors.torch import save_file

ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PIL resample codes, as image processors store them
_RESAMPLE_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}
_BACKBONE_PREFIX = "base_model.model.backbone."


def save_model(folder, config, state_dict):
    """model.safetensors (sharded when large) + config.json + the model's code, by transformers' save_pretrained, of
    the LTModel `config` describes holding `state_dict` (LTModel key names). The model is built on the meta device
    and takes the given tensors as they are: no second copy of the weights, whatever their size."""
    import torch

    from .modeling_lt import LTForImageClassification

    with without_zero3(), torch.device("meta"):
        model = LTForImageClassification(config)  # post_init's weight init runs here, on nothing
    model.lt.load_state_dict({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, strict=True,
                             assign=True)
    model.save_pretrained(str(folder))


@contextlib.contextmanager
def without_zero3():
    """Build and save a whole model on the main process alone, also inside a ZeRO-3 run: transformers would otherwise
    construct it inside deepspeed.zero.Init (partitioned, and collective: the other ranks are not there)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None  # what unset_hf_deepspeed_config() does; restored below
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def image_processor(spec):
    """A transformers image processor computing the evaluation view (build_eval_transform) of an image."""
    from transformers import CLIPImageProcessor

    size = int(spec.image_size)
    resize = int(spec.eval_resize or size * 8 // 7)
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": resize}, resample=_RESAMPLE_CODES[spec.interpolation],
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(spec.image_mean), image_std=list(spec.image_std), do_convert_rgb=True)


def plain_adapter_writer(lora_state, lora_config, base_model, head, head_type, head_scale):
    """f(export_dir) writing adapter/: the trained LoRA factors (LTModel module names: backbone.<module>.lora_A.weight)
    keyed to the base model as AutoModel loads it (base_model.model.<prefix><module>; a full CLIP checkpoint is a
    CLIPModel whose vision tower is vision_model.), targeting exactly the modules it trained, with
    base_model_name_or_path set; plus head.safetensors, the head to apply to the backbone's feature."""
    import copy

    lora = {k.removeprefix("backbone."): v for k, v in lora_state.items() if k.startswith("backbone.")}
    modules = sorted({re.sub(r"\.lora_[AB]\.weight$", "", k) for k in lora})
    prefix = _backbone_prefix(base_model, modules[0])
    config = copy.deepcopy(lora_config)
    config.base_model_name_or_path = str(base_model)
    config.target_modules = [prefix + m for m in modules]
    config.modules_to_save, config.inference_mode, config.auto_mapping = None, True, None

    def write(export_dir):
        adapter_dir = Path(export_dir) / ADAPTER_DIR
        adapter_dir.mkdir()
        save_file({"base_model.model." + prefix + k: v.detach().contiguous() for k, v in lora.items()},
                  str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(adapter_dir))
        save_file({k: v.detach().contiguous() for k, v in head.items()}, str(adapter_dir / HEAD_FILE),
                  metadata={"format": "pt", "head_type": head_type, "scale": str(head_scale)})

    return write


def _backbone_prefix(base_model, module):
    """Where the backbone's `module` sits in AutoModel.from_pretrained(base_model), found on an empty (meta) copy."""
    import torch
    from transformers import AutoConfig, AutoModel

    from .models import _quiet_transformers

    # on the main process alone, also under ZeRO-3 (inside zero.Init the build would wait for the other ranks)
    with without_zero3(), torch.device("meta"), _quiet_transformers():
        model = AutoModel.from_config(AutoConfig.from_pretrained(str(base_model)))
    found = [name for name, _ in model.named_modules() if name == module or name.endswith("." + module)]
    if len(found) != 1:  # e.g. a CLIPModel's text tower has the same names: the vision tower is the one wanted
        found = [name for name in found if name.startswith("vision_model.")] or found[:1]
    return found[0][: len(found[0]) - len(module)]
