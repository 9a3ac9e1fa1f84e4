"""Zero-shot image-text classifier (the baseline LIFT compares against), shaped like LTModel so `engine.evaluate`
runs it.

logits = logit_scale.exp() * cos(image embedding, text feature of the class) + logit_bias, where a class's text
feature is the normalised mean of the normalised embeddings of its prompts ("a photo of a {}." or the 80 ImageNet
templates): exactly the model's own `logits_per_image` against one (averaged) prompt per class. CLIP has no bias
(its probabilities are a softmax over classes); SigLIP's are sigmoid(logits), one per class, and its logit_bias is
one constant for every class, so the argmax (top-1 and every accuracy) is the same either way. eval_lt.py's NLL is
the softmax cross-entropy of these logits for both.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .head_init import load_text_tower
from .models import backbone_spec
from .prompts import class_prompts


class ZeroShotModel(nn.Module):
    """forward(pixel_values [B, 3, H, W]) -> logits [B, C]; `.spec` gives the preprocessing, as LTModel's does."""

    def __init__(self, model, tower, text_features, logit_scale, logit_bias, spec):
        super().__init__()
        self.model = model  # the image-text model, its text tower dropped
        self.tower = tower
        self.register_buffer("text_features", text_features)  # [C, joint], rows unit-norm
        self.register_buffer("logit_scale", logit_scale)  # already exponentiated (100 for OpenAI CLIP)
        self.register_buffer("logit_bias", logit_bias)  # 0 for CLIP
        self.spec = spec

    @property
    def num_classes(self):
        return self.text_features.shape[0]

    def forward(self, pixel_values):
        image = F.normalize(self.tower.image_embeds(self.model, pixel_values), dim=-1)
        return self.logit_scale * image @ self.text_features.to(image.dtype).t() + self.logit_bias


@torch.no_grad()
def build_zero_shot(model_name_or_path, class_names, prompts="single", device=None, batch_size=256,
                    descriptor_file=None):
    """A ZeroShotModel from a full CLIP or SigLIP checkpoint (Hub id or dir); the text tower is used once and dropped."""
    if not class_names:
        raise UserError("zero-shot classification needs at least one class name")
    prompts_per_class = class_prompts(prompts, class_names, descriptor_file)
    tower, model, tokenizer, kind, vision_config = load_text_tower(model_name_or_path, "--zero_shot")
    device = torch.device(device or "cpu")
    model.to(device)
    text = tower.class_embeddings(model, tokenizer, prompts_per_class, batch_size, device)
    model.text_model = None  # only the image side is needed from here on
    spec = backbone_spec(model_name_or_path, kind, vision_config)
    zero_shot = ZeroShotModel(model, tower, text, model.logit_scale.detach().exp().float().reshape(()),
                              tower.logit_bias(model).to(device), spec)
    return zero_shot.eval()
