"""The model of every export: LTModel (backbone feature -> method modules -> head) and its transformers pair,
LTConfig / LTForImageClassification, registered for the auto classes.

Self-contained on purpose: torch, transformers and its sibling files (peft_modules.py, heads.py, cifar_resnet.py and
what they import) only, imported relatively. `save_pretrained` copies this file and its relative imports beside the
weights, so an export loads with `AutoModelForImageClassification.from_pretrained(export, trust_remote_code=True)`
where lt_utils is not installed, and runs this very code. The project builds the same LTModel (lt_utils.models) and
loads every export with LTForImageClassification.from_pretrained (checkpoint.load_export): one definition of the model.
"""
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .cifar_resnet import CifarResNetModel
from .heads import HEADS
from .peft_modules import MODULES

# backbone classes that are not transformers' own: LTConfig.backbone_class -> class (their file travels with this one)
LOCAL_BACKBONES = {"CifarResNetModel": CifarResNetModel}

# backbone output -> the [B, D] feature the head sees; a BackboneKind names one (models.BACKBONES)
FEATURES = {
    "pooler_output": lambda out: out.pooler_output,  # CLIP: post-LayerNorm CLS, before the projection (LIFT)
    "cls_token": lambda out: out.last_hidden_state[:, 0],  # ViT
    "pooler_flat": lambda out: out.pooler_output.flatten(1),  # CNNs: pooled [B, D, 1, 1]
    # SigLIP: the attention-pool head's output (get_image_features); without the head (vision_use_head false) the
    # mean of last_hidden_state, as SiglipForImageClassification
    "pooler_or_token_mean": lambda out: out.pooler_output if out.pooler_output is not None
    else out.last_hidden_state.mean(1),
    # DINOv2: [CLS, mean of the patch tokens] after the final LayerNorm, as Dinov2ForImageClassification
    "cls_patch_mean": lambda out: torch.cat([out.last_hidden_state[:, 0], out.last_hidden_state[:, 1:].mean(1)], -1),
}
# features wider than the backbone's hidden size: name -> multiple
FEATURE_WIDTHS = {"cls_patch_mean": 2}


class LTModel(nn.Module):
    """Backbone feature -> head; `adapters` holds the modules a method adds (AdaptFormer, ...), hooked into the backbone.

    spec: the project's BackboneSpec (None in a model loaded as remote code); feature: a FEATURES name.
    """

    def __init__(self, backbone, head, spec=None, feature="pooler_output"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.adapters = None
        self.spec = spec
        self.feature = feature
        self.backbone_eval = False  # keep the (frozen) backbone in eval mode while training (--backbone_bn eval)

    def train(self, mode=True):
        super().train(mode)
        if mode and self.backbone_eval:
            self.backbone.eval()  # BatchNorm uses and keeps its running statistics
        return self

    @property
    def num_classes(self):
        return self.head.weight.shape[0]

    def features(self, pixel_values):
        return FEATURES[self.feature](self.backbone(pixel_values=pixel_values))

    def forward(self, pixel_values):
        return self.head(self.features(pixel_values))


class LTConfig(PretrainedConfig):
    """The one record of an export: what rebuilds its LTModel (the backbone's transformers class and config, the
    feature, the head, the method's modules; `layer_wiring`, `block_lists`, `block_parts` say where they go), labels
    as transformers' id2label, and what the project reads back: `backbone_spec` (geometry and preprocessing),
    `base_model` / `from_scratch` / `seed` (where the weights started), `head_init` (how the head started and its
    fingerprint), `lt_info` (the long-tailed split: counts, groups, how it was drawn; the
    class names are id2label), `run` (training data folder, subset, run name, Hub id) and `soup` (how a soup was
    merged).

    `method` is the method's config (lt_utils.methods): {"name": ..., its settings (r, partial_layers, ...)}, and
    "base": the recorded method of the export it was trained from (--init_from; a soup: its first ingredient's). It
    is the only record of the added modules: every recorded method with modules (peft_modules.MODULES) in that chain
    is re-attached from it, oldest first."""

    model_type = "lt_classifier"
    export_format = "lt-export-v5"

    def __init__(self, backbone_class="CLIPVisionModel", backbone_model_config=None, backbone_model_kwargs=None,
                 feature="pooler_output", head_type="cosine", head_scale=25.0, layer_wiring=None,
                 block_lists=None, block_parts=None, backbone_spec=None, base_model=None, from_scratch=False, seed=0,
                 method=None, head_init=None, lt_info=None, run=None, soup=None, lt_format=None, **kwargs):
        self.backbone_class = backbone_class
        self.backbone_model_config = backbone_model_config or {}
        self.backbone_model_kwargs = backbone_model_kwargs or {}
        self.feature = feature
        self.head_type = head_type
        self.head_scale = head_scale
        # where a method's modules go (peft_modules.find_blocks / encoder_layers): the backbone kind's wiring
        self.layer_wiring = [list(w) for w in (layer_wiring or [])]
        self.block_lists = list(block_lists or [])
        self.block_parts = {role: list(c) for role, c in (block_parts or {}).items()}
        self.backbone_spec = backbone_spec
        self.base_model = base_model
        self.from_scratch = bool(from_scratch)
        self.seed = seed
        self.method = method
        self.head_init = head_init or {}
        self.lt_info = lt_info
        self.run = run or {}
        self.soup = soup
        self.lt_format = lt_format or self.export_format
        super().__init__(**kwargs)


def lt_model_from_config(config):
    """An LTModel with the architecture `config` describes (weights at their init; from_pretrained loads them)."""
    backbone_cls = LOCAL_BACKBONES.get(config.backbone_class) or getattr(transformers, config.backbone_class)
    backbone_config = backbone_cls.config_class.from_dict(dict(config.backbone_model_config))
    backbone = backbone_cls(backbone_config, **config.backbone_model_kwargs)
    width = _hidden_size(backbone_config) * FEATURE_WIDTHS.get(config.feature, 1)
    head = HEADS.get(config.head_type)(config.num_labels, width, scale=config.head_scale)
    model = LTModel(backbone, head, feature=config.feature)
    for record in recorded_modules(config.method):
        model.adapters = MODULES[record["name"]](model, record, config)
        model.adapters.method = record["name"]
    return model


def recorded_modules(method):
    """The recorded methods (oldest first) whose modules the model holds: those of `method`'s chain (its "base",
    recursively) that peft_modules.MODULES builds."""
    chain = []
    while isinstance(method, dict):
        chain.insert(0, method)
        method = method.get("base")
    return [record for record in chain if record.get("name") in MODULES]


def _hidden_size(backbone_config):
    size = getattr(backbone_config, "hidden_size", None)
    return int(size if isinstance(size, int) else backbone_config.hidden_sizes[-1])


class LTForImageClassification(PreTrainedModel):
    """transformers' face of an LTModel: `pixel_values` -> ImageClassifierOutput(logits), for pipeline() and the Hub.

    `lt_model`: wrap an existing LTModel (the project exporting a trained model) instead of building one.
    """

    config_class = LTConfig
    base_model_prefix = "lt"
    main_input_name = "pixel_values"

    def __init__(self, config, lt_model=None):
        super().__init__(config)
        self.lt = lt_model if lt_model is not None else lt_model_from_config(config)
        self.post_init()

    def _init_weights(self, module):
        """Nothing: every module initialises itself (seeded head, zero-started adapters); exports load all weights."""

    def forward(self, pixel_values=None, labels=None, return_dict=None, **kwargs):
        logits = self.lt(pixel_values)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


LTConfig.register_for_auto_class()
LTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
