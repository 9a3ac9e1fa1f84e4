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


def make_tiny_clip(
    path, image_size=32, patch_size=8, hidden=32, layers=2, heads=2, projection_dim=16, seed=0, weights=True
):
    """A tiny full CLIP checkpoint (both towers), its tokenizer and a CLIPImageProcessor; returns the path."""
    from transformers import CLIPImageProcessor, CLIPModel

    path = Path(path)
    vocab_size = write_tiny_clip_tokenizer(path)
    config = tiny_clip_config(image_size, patch_size, hidden, layers, heads, projection_dim, vocab_size)
    if weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            CLIPModel(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
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
    if weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    else:
        config.save_pretrained(path)
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
