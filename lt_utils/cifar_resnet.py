"""CIFAR ResNets as the long-tail literature trains them from scratch (LOS, LDAM, ...): a 3x3 stride-1 stem, no
max-pool, stages of basic or bottleneck blocks, global average pooling. A transformers `PreTrainedModel` with its own
config, registered with the auto classes, so `save_pretrained` / `AutoModel.from_pretrained` work; the file imports
only torch and transformers, so a saved folder also loads as remote code (`trust_remote_code=True`).

  ResNet-18/34/50 (LOS: ResNet-34): widths 64-128-256-512, 1x1-conv shortcuts; ResNet-50 uses bottlenecks (x4).
  ResNet-32 (LDAM): three stages of five basic blocks, widths 16-32-64, parameter-free (zero-padded) shortcuts.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

PRESETS = {
    "resnet18": dict(block_type="basic", depths=[2, 2, 2, 2], widths=[64, 128, 256, 512], shortcut="conv"),
    "resnet34": dict(block_type="basic", depths=[3, 4, 6, 3], widths=[64, 128, 256, 512], shortcut="conv"),
    "resnet50": dict(block_type="bottleneck", depths=[3, 4, 6, 3], widths=[64, 128, 256, 512], shortcut="conv"),
    "resnet32": dict(block_type="basic", depths=[5, 5, 5], widths=[16, 32, 64], shortcut="pad"),
}


class CifarResNetConfig(PretrainedConfig):
    """block_type basic|bottleneck; depths: blocks per stage; widths: channels per stage (the stem has widths[0]);
    shortcut conv (1x1 conv + BN where the shape changes) | pad (stride-2 subsample, zero channels: LDAM's option A)."""

    model_type = "cifar_resnet"

    def __init__(self, block_type="basic", depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), shortcut="conv",
                 num_channels=3, image_size=32, **kwargs):
        if block_type not in ("basic", "bottleneck"):
            raise ValueError(f"block_type must be basic or bottleneck, got {block_type!r}")
        if shortcut not in ("conv", "pad"):
            raise ValueError(f"shortcut must be conv or pad, got {shortcut!r}")
        if len(depths) != len(widths) or not depths:
            raise ValueError(f"depths {list(depths)} and widths {list(widths)} must have the same non-zero length")
        self.block_type, self.depths, self.widths, self.shortcut = block_type, list(depths), list(widths), shortcut
        self.num_channels, self.image_size = int(num_channels), int(image_size)
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name, **kwargs):
        return cls(**PRESETS[name], **kwargs)

    @property
    def expansion(self):
        return 4 if self.block_type == "bottleneck" else 1

    @property
    def hidden_size(self):  # the pooled feature's size
        return self.widths[-1] * self.expansion

    @property
    def num_hidden_layers(self):  # residual blocks
        return sum(self.depths)

    @property
    def patch_size(self):  # total stride: one output pixel per patch (five-crop TTE offsets by 1.5 of it)
        return 2 ** (len(self.depths) - 1)


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Parameter-free shortcut: every second pixel, the new channels zero (split evenly before and after)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _shortcut(kind, cin, cout, stride):
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin, planes, stride, shortcut):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(shortcut, cin, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, shortcut):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(shortcut, cin, planes * 4, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNetPreTrainedModel(PreTrainedModel):
    config_class = CifarResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module):
        # PyTorch's own defaults, as the CIFAR reference code (LOS) leaves them
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class CifarResNetModel(CifarResNetPreTrainedModel):
    """pixel_values [B, C, H, W] -> last_hidden_state [B, D, H/s, W/s], pooler_output [B, D] (global average)."""

    def __init__(self, config):
        super().__init__(config)
        block = Bottleneck if config.block_type == "bottleneck" else BasicBlock
        self.conv1 = _conv3x3(config.num_channels, config.widths[0])
        self.bn1 = nn.BatchNorm2d(config.widths[0])
        stages, cin = [], config.widths[0]
        for i, (depth, width) in enumerate(zip(config.depths, config.widths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1, config.shortcut))
                cin = width * config.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.post_init()

    def forward(self, pixel_values, return_dict=None, **kwargs):
        x = F.relu(self.bn1(self.conv1(pixel_values)))
        for stage in self.stages:
            x = stage(x)
        pooled = x.mean(dim=(2, 3))
        if return_dict is False:
            return x, pooled
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=x, pooler_output=pooled)


class CifarResNetForImageClassification(CifarResNetPreTrainedModel):
    """The backbone and a linear classifier with bias (the LT papers' fc), for `pipeline("image-classification")`."""

    def __init__(self, config):
        super().__init__(config)
        self.resnet = CifarResNetModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

        logits = self.classifier(self.resnet(pixel_values).pooler_output)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


AutoConfig.register("cifar_resnet", CifarResNetConfig, exist_ok=True)
AutoModel.register(CifarResNetConfig, CifarResNetModel, exist_ok=True)
try:
    from transformers import AutoModelForImageClassification

    AutoModelForImageClassification.register(CifarResNetConfig, CifarResNetForImageClassification, exist_ok=True)
except ImportError:  # pragma: no cover
    pass
# save_pretrained then writes an auto_map and copies this file: the folder loads without this project installed
CifarResNetConfig.register_for_auto_class()
CifarResNetModel.register_for_auto_class("AutoModel")
CifarResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")
