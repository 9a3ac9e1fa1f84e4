"""Tiny, offline model checkpoints for tests, written with the real `save_pretrained` paths.

    from tests.helpers_models import make_tiny_clip, make_tiny_vit
    clip_dir = make_tiny_clip(tmp_path / "clip")      # CLIPModel + tokenizer + image processor
    vit_dir = make_tiny_vit(tmp_path / "vit")         # ViTModel + image processor

Each call is seeded: the same arguments write the same weights. `weights=False` writes a config-only dir
(tokenizer and processor included), as used with `from_scratch=True`. `vit_b16_clip_config()` and
`vit_b16_vit_config()` give ViT-B/16 shapes for parameter counts (build them on the meta device).
"""
import json
from pathlib import Path

import torch

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# A few real BPE merges so merges.txt is exercised: "photo" becomes one token.
MERGES = (("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"))


def _byte_to_unicode():
    """Byte-level BPE alphabet: printable Latin-1 bytes map to themselves, the rest to code points from 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_tiny_clip_tokenizer(path):
    """vocab.json + merges.txt for a character-level CLIP BPE (every byte, alone and word-final); returns vocab size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + list(SPECIALS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return len(vocab)


def tiny_clip_config(image_size=32, patch_size=8, hidden=32, layers=2, heads=2, projection_dim=16, vocab_size=None):
    from transformers import CLIPConfig

    vocab_size = vocab_size or (2 * 256 + len(MERGES) + len(SPECIALS))
    bos, eos = vocab_size - 2, vocab_size - 1  # SPECIALS are the last two vocab entries
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden)
    text = dict(
        common, vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos
    )
    vision = dict(common, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_model_or_config(path, config, build, seed=0, weights=True):
    """`build(config)` initialised from `seed` (the global RNG untouched) and saved, or the config alone when not
    `weights` (a checkpoint loaded with from_scratch)."""
    if not weights:
        config.save_pretrained(path)
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        build(config).save_pretrained(path)


def make_tiny_clip(
    path, image_size=32, patch_size=8, hidden=32, layers=2, heads=2, projection_dim=16, seed=0, weights=True
):
    """A tiny full CLIP checkpoint (both towers), its tokenizer and a CLIPImageProcessor; returns the path."""
    from transformers import CLIPImageProcessor, CLIPModel

    path = Path(path)
    vocab_size = write_tiny_clip_tokenizer(path)
    config = tiny_clip_config(image_size, patch_size, hidden, layers, heads, projection_dim, vocab_size)
    save_model_or_config(path, config, CLIPModel, seed, weights)
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def make_tiny_vit(path, image_size=32, patch_size=8, hidden=32, layers=2, heads=2, seed=0, weights=True):
    """A tiny ViTModel checkpoint (no pooler) and a ViTImageProcessor; returns the path."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
        image_size=image_size, patch_size=patch_size,
    )
    save_model_or_config(path, config, lambda c: ViTModel(c, add_pooling_layer=False), seed, weights)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


# ViT-B/16 at 224 px: the shapes of the papers' parameter-count table
VIT_B16_SHAPES = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)


def vit_b16_clip_config():
    """CLIP ViT-B/16 vision tower shapes (D 768, L 12, 224 px)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VIT_B16_SHAPES, projection_dim=512)


def vit_b16_vit_config():
    from transformers import ViTConfig

    return ViTConfig(**VIT_B16_SHAPES)


def write_config_only(path, config):
    """A config-only model dir (for `from_scratch=True` or meta-device builds); returns the path."""
    path = Path(path)
    config.save_pretrained(path)
    return path


def random_pixels(batch, image_size=32, seed=0):
    """Normalised-looking pixel values [B, 3, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


# ---- SigLIP and DINOv2 ------------------------------------------------------------------------------------------
SIGLIP_WORDS = ("a", "photo", "of", "the", "my", "itap", "toy", ".", "/", "-")


def write_tiny_word_tokenizer(path, max_length=16):
    """A word-level `tokenizers` tokenizer (tokenizer.json) that appends </s>, as SigLIP's does: pad 0, </s> 1, unk 2,
    then lower-case words and letters (unknown words fall back to unk). Returns the vocab size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["<pad>", "</s>", "<unk>", *SIGLIP_WORDS, "cat", "maple", "tree", "aquarium", "fish", "ankle", "boot",
             *letters]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=max_length).save_pretrained(path)
    return len(vocab)


def tiny_siglip_config(image_size=32, patch_size=8, hidden=32, layers=2, heads=2, vocab_size=64, max_length=16,
                       vision_use_head=True):
    from transformers import SiglipConfig

    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden)
    text = dict(common, vocab_size=vocab_size, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=1,
                eos_token_id=1, projection_size=hidden)
    vision = dict(common, image_size=image_size, patch_size=patch_size, vision_use_head=vision_use_head)
    return SiglipConfig(text_config=text, vision_config=vision)


def _siglip_with_scale_and_bias(config):
    from transformers import SiglipModel

    model = SiglipModel(config)
    with torch.no_grad():  # a non-trivial scale and bias (SigLIP's init: log 10, -10)
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-3.0)
    return model


def make_tiny_siglip(path, image_size=32, patch_size=8, hidden=32, layers=2, heads=2, seed=0, weights=True):
    """A tiny full SigLIP checkpoint (both towers, logit_scale / logit_bias), its tokenizer and a
    SiglipImageProcessor; returns the path."""
    from transformers import SiglipImageProcessor

    path = Path(path)
    vocab_size = write_tiny_word_tokenizer(path)
    config = tiny_siglip_config(image_size, patch_size, hidden, layers, heads, vocab_size)
    save_model_or_config(path, config, _siglip_with_scale_and_bias, seed, weights)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def make_tiny_dinov2(path, image_size=32, patch_size=8, hidden=32, layers=2, heads=2, seed=0, weights=True,
                     config_image_size=None):
    """A tiny Dinov2Model checkpoint and its processor (BitImageProcessor: ImageNet mean/std, bicubic, shorter side
    to image_size * 8 / 7, centre crop image_size, as dinov2-base's 256 / 224); `config_image_size` sets the
    position grid of the config (dinov2-base: 518) apart from the processor's crop. Returns the path."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = Path(path)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=2,
                          image_size=config_image_size or image_size, patch_size=patch_size, layerscale_value=0.5)
    save_model_or_config(path, config, Dinov2Model, seed, weights)
    BitImageProcessor(size={"shortest_edge": image_size * 8 // 7}, crop_size={"height": image_size, "width": image_size},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
                      do_convert_rgb=True).save_pretrained(path)
    return path


def siglip_base_config():
    """google/siglip-base-patch16-224's vision tower shapes (D 768, L 12, MLP 3072, 224 px, patch 16)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**VIT_B16_SHAPES)


def dinov2_base_config():
    """facebook/dinov2-base's shapes (D 768, L 12, MLP ratio 4, patch 14, a 518-px position grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=518,
                        patch_size=14)
