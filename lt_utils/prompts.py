"""Class prompts for CLIP text features (the text head init and zero-shot CLIP): a class's text feature is the mean of
its prompts' normalised features. Modes (LIFT's): single ("a photo of a {}."), ensemble (CLIP's 80 ImageNet
templates), classname (the bare name), descriptor (a user JSON file of descriptions per class)."""
import json
from pathlib import Path

from .errors import UserError, require
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

# `--prompt_template`: f(class_names, descriptor_file) -> each class's prompts (a list of strings per class)
PROMPT_MODES = Registry("prompt mode")


def templated(templates):
    """A mode that fills each "{}" template with the (cleaned) class name."""
    return lambda class_names, descriptor_file=None: [[t.format(clean_class_name(c)) for t in templates]
                                                      for c in class_names]


PROMPT_MODES.register("single", templated((SINGLE_TEMPLATE,)))
PROMPT_MODES.register("ensemble", templated(IMAGENET_TEMPLATES))
PROMPT_MODES.register("classname", templated(("{}",)))


@PROMPT_MODES.register("descriptor")
def _descriptor_prompts(class_names, descriptor_file=None):
    """The descriptions the file gives for each class, used as they are (LIFT: utils/descriptors_imagenet.json)."""
    descriptors = load_descriptors(descriptor_file)
    rows, missing = [], []
    for name in class_names:
        texts = descriptors.get(name, descriptors.get(clean_class_name(name)))
        if texts is None:
            missing.append(name)
            continue
        rows.append([clean_class_name(t) for t in texts])
    require(not missing, f"--prompt_descriptor_file {descriptor_file} has no descriptions for classes "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; add them (keyed by class name)")
    return rows


def load_descriptors(path):
    """{class name: [description, ...]} from a JSON file, checked."""
    require(path, "--prompt_template descriptor needs --prompt_descriptor_file FILE.json ({class: [descriptions]})")
    path = Path(path)
    require(path.is_file(), f"--prompt_descriptor_file {path} not found; pass a JSON file {{class: [descriptions]}}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--prompt_descriptor_file {path} is not valid JSON ({err.__class__.__name__}); fix it") from None
    bad = [k for k, v in data.items() if not (isinstance(v, list) and v and all(isinstance(t, str) and t.strip() for t in v))] \
        if isinstance(data, dict) else None
    require(bad == [], f"--prompt_descriptor_file {path} must map each class name to a non-empty list of "
                       f"non-empty strings{'; bad: ' + str(bad[:3]) if bad else ''}")
    return data


def check_prompt_args(prompt_template, descriptor_file=None):
    """Before anything is written: a descriptor file is read now, and given only with --prompt_template descriptor."""
    if prompt_template == "descriptor":
        load_descriptors(descriptor_file)
    else:
        require(descriptor_file is None,
                f"--prompt_descriptor_file needs --prompt_template descriptor (got {prompt_template}); drop one")


def clean_class_name(name):
    """Dataset class names often use underscores ("maple_tree"); CLIP was trained on natural text."""
    return " ".join(str(name).replace("_", " ").split())


def class_prompts(prompts, class_names, descriptor_file=None):
    """Each class's prompts, for a mode name or an explicit sequence of "{}" templates."""
    if isinstance(prompts, str):
        return PROMPT_MODES.get(prompts)(list(class_names), descriptor_file)
    templates = tuple(prompts)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UserError(f"prompt templates must be non-empty and each contain '{{}}'; got {bad or 'none'}")
    return templated(templates)(list(class_names))
