"""Zero-shot CLIP classifier (LIFT's baseline, lt_methods.md §10), shaped like LTModel so `engine.evaluate` runs it.

logits = logit_scale.exp() * cos(visual_projection(pooled image), text feature of the class), where a class's text
feature is the normalised mean of the normalised projected embeddings of its prompts ("a photo of a {}." or the 80
ImageNet templates): exactly CLIPModel's `logits_per_image` against one (averaged) prompt per class.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .head_init import _class_text_features
from .models import BackboneSpec, _preprocessing, load_backbone_config
from .prompts import class_prompts


class ZeroShotCLIP(nn.Module):
    """forward(pixel_values [B, 3, H, W]) -> logits [B, C]; `.spec` gives the preprocessing, as LTModel's does."""

    def __init__(self, vision_model, visual_projection, text_features, logit_scale, spec):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.register_buffer("text_features", text_features)  # [C, proj], rows unit-norm
        self.register_buffer("logit_scale", logit_scale)  # already exponentiated (100 for OpenAI CLIP)
        self.spec = spec

    @property
    def num_classes(self):
        return self.text_features.shape[0]

    def forward(self, pixel_values):
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        image = F.normalize(self.visual_projection(pooled), dim=-1)
        return self.logit_scale * image @ self.text_features.to(image.dtype).t()


@torch.no_grad()
def build_zero_shot_clip(model_name_or_path, class_names, prompts="single", device=None, batch_size=256,
                         descriptor_file=None):
    """A ZeroShotCLIP from a full CLIP checkpoint (Hub id or dir); the text tower is used once and dropped."""
    name = os.path.expanduser(str(model_name_or_path))
    _, config, vision_config = load_backbone_config(name)
    if config.model_type != "clip":
        raise UserError(f"--zero_shot needs a full CLIP checkpoint (image and text towers); {name!r} is a "
                        f"{config.model_type!r} model")
    if not class_names:
        raise UserError("zero-shot classification needs at least one class name")
    clip, tokenizer = _load_clip(name)
    device = torch.device(device or "cpu")
    clip.to(device).eval()
    text = _class_text_features(clip, tokenizer, class_prompts(prompts, class_names, descriptor_file), batch_size, device)
    model = ZeroShotCLIP(clip.vision_model, clip.visual_projection, text, clip.logit_scale.detach().exp().float(),
                         _clip_spec(name, vision_config))
    return model.eval()


def _load_clip(name):
    from transformers import AutoTokenizer, CLIPModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        clip = CLIPModel.from_pretrained(name, dtype=torch.float32)
    except OSError as err:
        raise UserError(f"cannot load the CLIP model or its tokenizer from {name!r}; pass a full CLIP checkpoint "
                        "(e.g. openai/clip-vit-base-patch16) saved with its tokenizer") from err
    return clip, tokenizer


def _clip_spec(name, vision_config):
    mean, std, interpolation = _preprocessing(name, "clip")
    return BackboneSpec(kind="clip", name_or_path=name, hidden_size=int(vision_config.hidden_size),
                        num_layers=int(vision_config.num_hidden_layers), image_size=int(vision_config.image_size),
                        patch_size=int(vision_config.patch_size), image_mean=mean, image_std=std,
                        interpolation=interpolation)
