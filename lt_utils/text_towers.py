"""Image-text backbones' text towers (CLIP, SigLIP): class-prompt embeddings for `--head_init text` and the
zero-shot classifier. One TextTower per family, held by its BACKBONES entry (`BackboneKind.text_tower`).

A tower answers four questions: which full checkpoint (model_type, class) holds both towers; how prompts are
tokenised (CLIP: padded to the batch, masked; SigLIP: padded to max_length, unmasked, as it was trained); how a prompt becomes its
joint-space embedding; and how the joint space maps to the vision feature LTModel sees (CLIP: the feature is
before `visual_projection`, so text rows go back through it; SigLIP: the feature IS the joint-space embedding).
"""
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class TextTower:
    model_type = None  # config.model_type of the full (image + text) checkpoint
    model_class = None  # transformers class of the full model
    padding = True  # tokenizer padding
    inputs = ("input_ids", "attention_mask")  # what of the tokenizer's output the text tower gets

    def load_model(self, name):
        import transformers

        return getattr(transformers, self.model_class).from_pretrained(name, dtype=torch.float32)

    def max_length(self, model):
        return model.config.text_config.max_position_embeddings

    def text_embeds(self, model, tokens):
        """[N, joint] embeddings of tokenised prompts (not normalised)."""
        return model.get_text_features(**tokens).pooler_output

    def image_embeds(self, model, pixel_values):
        """[N, joint] embeddings of images (not normalised)."""
        return model.get_image_features(pixel_values=pixel_values).pooler_output

    def to_feature_space(self, model, text):
        """Unit joint-space rows [C, joint] -> rows in the space of LTModel.features [C, D] (renormalised later)."""
        return text

    def logit_bias(self, model):
        return torch.zeros(())

    def check(self, model, hidden_size, name):
        """None, or why this checkpoint's text rows cannot initialise a head over its vision features."""
        return None

    @torch.no_grad()
    def class_embeddings(self, model, tokenizer, prompts_per_class, batch_size, device):
        """[C, joint] normalised mean, over each class's prompts, of the normalised prompt embeddings; batched over
        all prompts."""
        pairs = [(c, p) for c, prompts in enumerate(prompts_per_class) for p in prompts]
        sums = None
        for start in tqdm(range(0, len(pairs), batch_size), desc="text features", disable=len(pairs) <= batch_size):
            chunk = pairs[start : start + batch_size]
            tokens = tokenizer([p for _, p in chunk], padding=self.padding, truncation=True,
                               max_length=self.max_length(model), return_tensors="pt")
            tokens = {k: v.to(device) for k, v in tokens.items() if k in self.inputs}
            feats = F.normalize(self.text_embeds(model, tokens).float(), dim=-1)
            if sums is None:
                sums = torch.zeros(len(prompts_per_class), feats.shape[-1], dtype=torch.float32, device=device)
            sums.index_add_(0, torch.tensor([c for c, _ in chunk], device=device), feats)
        counts = torch.tensor([len(p) for p in prompts_per_class], dtype=torch.float32, device=device)
        return F.normalize(sums / counts[:, None], dim=-1)


class ClipTextTower(TextTower):
    """CLIP: contrastive softmax; the vision feature (post-LN CLS) is mapped to the joint space by
    `visual_projection`, so a text row goes back as text @ W (LIFT's text_feat @ proj.T)."""

    model_type = "clip"
    model_class = "CLIPModel"

    def to_feature_space(self, model, text):
        return text @ model.visual_projection.weight.float()


class SiglipTextTower(TextTower):
    """SigLIP: sigmoid loss, logits = exp(logit_scale) * cos + logit_bias; the text tower pools its last token, so
    prompts are padded to max_length as in training. Its vision feature (the attention-pool head's output) is
    already the joint-space embedding."""

    model_type = "siglip"
    model_class = "SiglipModel"
    padding = "max_length"
    inputs = ("input_ids",)  # no attention mask: SigLIP's tokenizer returns none, the tower was trained on pads

    def logit_bias(self, model):
        return model.logit_bias.detach().float().reshape(())

    def check(self, model, hidden_size, name):
        vision, text = model.config.vision_config, model.config.text_config
        if not getattr(vision, "vision_use_head", True):
            return f"{name!r} has no vision attention-pool head, so its image features are not text-aligned"
        size = getattr(text, "projection_size", None) or text.hidden_size
        if size != hidden_size:
            return f"{name!r} has text embeddings of size {size} but image features of size {hidden_size}"
        return None
