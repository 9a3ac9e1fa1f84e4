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
import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PIL resample codes, as image processors store them
_RESAMPLE_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}
_BACKBONE_PREFIX = "base_model.model.backbone."


def write_hub_files(export_dir, meta):
    """Write the files above into `export_dir`, which already holds the project's export (lt_model.json, weights)."""
    from .checkpoint import LT_ADAPTER_DIR, build_from_meta
    from .models import BackboneSpec, hf_model

    export_dir = Path(export_dir)
    with _without_zero3():  # every model built here (also the meta copy in write_plain_adapter) is built whole
        model = build_from_meta(meta, export_dir, merge_lora=True).eval()
        hf_model(model, meta).save_pretrained(str(export_dir))
        image_processor(BackboneSpec.from_dict(meta["backbone"])).save_pretrained(str(export_dir))
        if (meta.get("arch") or {}).get("lora"):
            write_plain_adapter(export_dir / LT_ADAPTER_DIR, export_dir / ADAPTER_DIR, meta)
            head = {k.removeprefix("head."): v.detach().contiguous() for k, v in model.state_dict().items()
                    if k.startswith("head.")}
            save_file(head, str(export_dir / ADAPTER_DIR / HEAD_FILE), metadata={
                "format": "pt", "head_type": meta["head"]["type"], "scale": str(meta["head"]["scale"])})


@contextlib.contextmanager
def _without_zero3():
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


def write_plain_adapter(lt_adapter_dir, adapter_dir, meta):
    """The training adapter (keyed to the LTModel wrapper: base_model.model.backbone.<module>) re-keyed to the base
    model as AutoModel loads it (base_model.model.<prefix><module>; a full CLIP checkpoint is a CLIPModel whose vision
    tower is vision_model.), targeting exactly the modules it trained, with base_model_name_or_path set."""
    weights = load_file(str(Path(lt_adapter_dir) / "adapter_model.safetensors"))
    lora = {k.removeprefix(_BACKBONE_PREFIX): v for k, v in weights.items() if k.startswith(_BACKBONE_PREFIX) and ".lora_" in k}
    modules = sorted({re.sub(r"\.lora_[AB](\.[\w-]+)?\.weight$", "", k) for k in lora})
    prefix = _backbone_prefix(meta["base_model"], modules[0])
    config = json.loads((Path(lt_adapter_dir) / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=str(meta["base_model"]), target_modules=[prefix + m for m in modules],
                  modules_to_save=None, inference_mode=True, auto_mapping=None)
    Path(adapter_dir).mkdir()
    save_file({"base_model.model." + prefix + k: v for k, v in lora.items()}, str(Path(adapter_dir) / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (Path(adapter_dir) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def _backbone_prefix(base_model, module):
    """Where the backbone's `module` sits in AutoModel.from_pretrained(base_model), found on an empty (meta) copy."""
    import torch
    from transformers import AutoConfig, AutoModel

    from .models import _quiet_transformers

    with torch.device("meta"), _quiet_transformers():
        model = AutoModel.from_config(AutoConfig.from_pretrained(str(base_model)))
    found = [name for name, _ in model.named_modules() if name == module or name.endswith("." + module)]
    if len(found) != 1:  # e.g. a CLIPModel's text tower has the same names: the vision tower is the one wanted
        found = [name for name in found if name.startswith("vision_model.")] or found[:1]
    return found[0][: len(found[0]) - len(module)]
