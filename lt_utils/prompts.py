"""Prompt templates for CLIP text-feature head initialisation."""
from .errors import UserError
from .registry import Registry

SINGLE_TEMPLATE = "a photo of a {}."

# The 80 ImageNet prompt templates published with OpenAI CLIP (its ImageNet prompt-engineering notebook).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# `--prompt_template`: the "{}" templates of each mode (averaged per class)
PROMPT_MODES = Registry("prompt mode")
PROMPT_MODES.register("single", (SINGLE_TEMPLATE,))
PROMPT_MODES.register("ensemble", IMAGENET_TEMPLATES)


def clean_class_name(name):
    """Dataset class names often use underscores ("maple_tree"); CLIP was trained on natural text."""
    return " ".join(str(name).replace("_", " ").split())


def prompt_templates(prompts):
    """Templates for a mode name ("single" | "ensemble") or an explicit sequence of "{}" templates."""
    if isinstance(prompts, str):
        return PROMPT_MODES.get(prompts)
    templates = tuple(prompts)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UserError(f"prompt templates must be non-empty and each contain '{{}}'; got {bad or 'none'}")
    return templates
