"""The Hub-native files of an export dir, so it works with transformers / peft alone (no lt_utils):

* config.json + model.safetensors + modeling_lt.py (and the files it imports): LTForImageClassification as remote
  code, the whole model with LoRA merged in (`AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True)`);
* preprocessor_config.json: the evaluation preprocessing (shorter side to 8/7 of the resolution, centre crop, the
  interpolation, mean/std), pixel for pixel what transforms.build_eval_transform computes;
* LoRA runs: adapter_config.json + adapter_model.safetensors, a standard peft adapter of the plain base backbone
  (`PeftModel.from_pretrained(AutoModel.from_pretrained(base), d)`), and head.safetensors, the head for its feature.
"""
import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

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
    model = build_from_meta(meta, export_dir, merge_lora=True).eval()
    hf_model(model, meta).save_pretrained(str(export_dir))
    image_processor(BackboneSpec.from_dict(meta["backbone"])).save_pretrained(str(export_dir))
    if (meta.get("arch") or {}).get("lora"):
        write_plain_adapter(export_dir / LT_ADAPTER_DIR, export_dir, meta)
        head = {k.removeprefix("head."): v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith("head.")}
        save_file(head, str(export_dir / HEAD_FILE), metadata={
            "format": "pt", "head_type": meta["head"]["type"], "scale": str(meta["head"]["scale"])})


def image_processor(spec):
    """A transformers image processor computing the evaluation view (build_eval_transform) of an image."""
    from transformers import CLIPImageProcessor

    size = int(spec.image_size)
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size * 8 // 7}, resample=_RESAMPLE_CODES[spec.interpolation],
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(spec.image_mean), image_std=list(spec.image_std), do_convert_rgb=True)


def write_plain_adapter(lt_adapter_dir, export_dir, meta):
    """The training adapter (keyed to the LTModel wrapper: base_model.model.backbone.<module>) re-keyed to the plain
    backbone (base_model.model.<module>), targeting exactly the modules it trained, with base_model_name_or_path set.

    The same module names exist in the base as AutoModel loads it (CLIPModel and CLIPVisionModel both name the
    vision tower vision_model), so the adapter applies to either.
    """
    weights = load_file(str(Path(lt_adapter_dir) / "adapter_model.safetensors"))
    plain = {_BACKBONE_PREFIX.replace("backbone.", "") + k.removeprefix(_BACKBONE_PREFIX): v
             for k, v in weights.items() if k.startswith(_BACKBONE_PREFIX) and ".lora_" in k}
    modules = sorted({re.sub(r"\.lora_[AB](\.[\w-]+)?\.weight$", "", k.removeprefix("base_model.model.")) for k in plain})
    config = json.loads((Path(lt_adapter_dir) / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=str(meta["base_model"]), target_modules=modules, modules_to_save=None,
                  inference_mode=True)
    save_file(plain, str(Path(export_dir) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (Path(export_dir) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
