"""FMWISS's pseudo-mask sources where the user has the foundation models (`incremental.masks`
`clip` and `dino`): CLIP's dense pixel–text scores for the initial mask, a self-supervised
ViT's (DINO's) last-block attention from seed points for the seeds guidance.

- **CLIP** (open_clip): each tagged class's text embedding is the mean over a prompt-template
  ensemble (`TEMPLATES`), L2-normalised. Dense image features follow MaskCLIP: the last
  transformer block's value embedding of every patch token, through the block's output
  projection, the final norm and CLIP's projection, L2-normalised; a pixel's class scores are
  the cosines, as CLIP's logits (× its `logit_scale`), in a softmax over the image's tags and a
  background prompt.
- **DINO** (timm): the last block's attention of the patch tokens, averaged over the heads; a
  class's guidance is the mean of the attention rows of its seed points' patches.

Both load through their hubs' own machinery: open_clip's `hf-hub:org/repo` (downloaded once into
the Hugging Face cache) or `local-dir:/path` (a folder of `open_clip_config.json` and weights),
timm's pretrained tags (e.g. `vit_small_patch16_224.dino`) or a weights file given beside one.
Weights are read as tensors only (safetensors, or torch's `weights_only`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from pipeline.models.tag_masks import draw_seeds

# A short prompt ensemble from CLIP's ImageNet templates: the class name alone is a weaker query.
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of a large {}.",
             "a close-up photo of a {}.", "a cropped photo of a {}.", "there is a {} in the scene.",
             "a photo of the {} in the scene.")


# What a pixel of none of an image's tags is, for CLIP to score it against them (MaskCLIP's way of
# deciding background, rather than a threshold on the scores).
BACKGROUND_PROMPT = "background"


class FoundationError(RuntimeError):
    """A foundation model that cannot be loaded or used, said in one line."""


# What open_clip and timm raise for a model they cannot load: the hub's errors and missing files
# are OSErrors, a wrong name or config ValueError/KeyError/RuntimeError (torch's own for
# mismatched weights), a damaged safetensors file SafetensorError.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _unit(x: torch.Tensor, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """Images in the model range [-1, 1] → the foundation model's input: `size`² and its normalisation."""
    x = F.interpolate((x.float() + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean, device=x.device)[:, None, None]) / torch.tensor(std, device=x.device)[:, None, None]


def clip_text(model: nn.Module, tokenizer, class_names: list[str], templates: tuple[str, ...] = TEMPLATES
              ) -> torch.Tensor:
    """CLIP's zero-shot classifier of `class_names`: per name, then the background prompt, the
    mean of its templates' unit text embeddings, L2-normalised. (K+1)×D."""
    names = [*class_names, BACKGROUND_PROMPT]
    with torch.no_grad():
        tokens = tokenizer([t.format(name) for name in names for t in templates])
        text = F.normalize(model.encode_text(tokens).float(), dim=-1).view(len(names), len(templates), -1)
    return F.normalize(text.mean(dim=1), dim=-1)


class ClipScores(nn.Module):
    """CLIP's dense scores (MaskCLIP's value path) against `text`, the class names' embeddings
    (`clip_text`)."""

    def __init__(self, model: nn.Module, text: torch.Tensor):
        super().__init__()
        visual = model.visual
        blocks = visual.transformer.resblocks
        if (not hasattr(visual, "_embeds") or getattr(visual, "proj", None) is None
                or not isinstance(getattr(blocks[-1], "attn", None), nn.MultiheadAttention)):
            raise FoundationError(f"CLIP {type(visual).__name__}: dense scores need a ViT image tower whose "
                                  "blocks use torch's MultiheadAttention and that ends in a projection "
                                  "(open_clip's standard ViT)")
        if text.shape[-1] != visual.proj.shape[1]:
            raise FoundationError(f"CLIP's image embeddings have {visual.proj.shape[1]} dimensions, the class names' "
                                  f"{text.shape[-1]}: they come from another CLIP (rerun tag_classifier)")
        self.visual, self.logit_scale = visual, float(model.logit_scale.detach().exp())
        self.size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        # open_clip's loaders set the weights' normalisation; CLIP's own where a model was built bare.
        self.mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("text", text.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine scores N×(K+1)×g×g (g: CLIP's patch grid; the last: the background prompt) of
        images in the model range."""
        visual = self.visual
        tokens = visual._embeds(_unit(x, self.size, self.mean, self.std))
        transformer = visual.transformer
        if not transformer.batch_first:
            tokens = tokens.transpose(0, 1)
        for block in transformer.resblocks[:-1]:
            tokens = block(tokens)
        last = transformer.resblocks[-1]
        width = tokens.shape[-1]
        # The value path only: position-wise, so the token layout does not matter.
        value = F.linear(last.ln_1(tokens), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
        dense = last.attn.out_proj(value)
        if not transformer.batch_first:
            dense = dense.transpose(0, 1)
        dense = visual.ln_post(dense[:, 1:]) @ visual.proj  # the patch tokens, N×P×D
        scores = F.normalize(dense.float(), dim=-1) @ self.text.t()
        grid = int(scores.shape[1] ** 0.5)
        return scores.transpose(1, 2).reshape(len(x), -1, grid, grid)

    def class_maps(self, x: torch.Tensor, tags: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The tagged classes' maps at `size`, in [0, 1] as the local stand-in's activation maps
        are: each pixel's probability of the class in a softmax of CLIP's logits over the image's
        tags and the background prompt (so an image with one tag is not all that class); zero
        for a class the image is not tagged with. `tags`: N×K bool."""
        logits = self.forward(x) * self.logit_scale
        competing = torch.cat([tags, torch.ones_like(tags[:, :1])], dim=1)
        probs = logits.masked_fill(~competing[:, :, None, None], float("-inf")).softmax(dim=1)[:, :-1]
        return F.interpolate(probs, size=size, mode="bilinear", align_corners=False) * tags[:, :, None, None]


class DinoAttention(nn.Module):
    """A timm ViT's last-block attention among its patch tokens, averaged over the heads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        last = getattr(model, "blocks", [None])[-1]
        if not hasattr(getattr(last, "attn", None), "qkv"):
            raise FoundationError(f"{type(model).__name__}: seeds guidance needs a timm ViT (blocks with a qkv attention)")
        self.model = model
        cfg = model.pretrained_cfg
        self.size, self.mean, self.std = cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×P×P: row i is patch i's attention over the P patches (g×g grid, row-major)."""
        vit = self.model
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(_unit(x, self.size, self.mean, self.std)))))
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        attn = vit.blocks[-1].attn
        n, length, width = tokens.shape
        qkv = attn.qkv(vit.blocks[-1].norm1(tokens)).reshape(n, length, 3, attn.num_heads, width // attn.num_heads)
        q, k = attn.q_norm(qkv[:, :, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1).mean(dim=1)
        prefix = vit.num_prefix_tokens
        return weights[:, prefix:, prefix:]


def attention_guidance(attention: torch.Tensor, initial: torch.Tensor, num_classes: int, seeds: int,
                       threshold: float, generator: torch.Generator) -> torch.Tensor:
    """Per class, the pixels where the mean attention of `seeds` points drawn inside the class's
    initial mask (uint8 N×H×W, class k + 1), taken at their patches, scaled to a peak of 1,
    is above `threshold`. `attention`: N×P×P over a g×g patch grid. bool N×K×H×W; all False
    for a class with no initial pixel."""
    n, height, width = initial.shape
    grid = int(attention.shape[-1] ** 0.5)
    chosen, present = draw_seeds(initial, num_classes, seeds, generator)
    rows, cols = chosen // width * grid // height, chosen % width * grid // width
    patches = (rows * grid + cols).view(n, -1)
    picked = attention.float().gather(1, patches[..., None].expand(-1, -1, attention.shape[-1]))
    maps = picked.view(n, num_classes, seeds, grid, grid).mean(dim=2)
    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    return (maps > threshold) & present[..., None, None]


def load_clip(name: str) -> tuple[nn.Module, object]:
    """open_clip's model `name` (`hf-hub:org/repo`, `local-dir:/path`, or a built-in name with
    its weights as `name@pretrained-tag-or-file`), in eval mode, and its tokenizer."""
    import open_clip

    model_name, _, pretrained = name.partition("@")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model_name)
    except LOAD_ERRORS as err:
        raise FoundationError(f"incremental.masks.clip {name!r}: could not be loaded ({_first_line(err)})") from None
    return model.eval(), tokenizer


def load_dino(name: str, weights: Path | None = None) -> DinoAttention:
    """timm's model `name` with its pretrained weights: from `weights` (a file) where given,
    else through timm's hub (the Hugging Face cache; offline, the cache alone)."""
    import timm

    overlay = {"file": str(weights)} if weights else None
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except LOAD_ERRORS as err:
        where = f"from {weights}" if weights else "through timm's hub"
        raise FoundationError(f"incremental.masks.dino {name!r}: could not be loaded {where} ({_first_line(err)})") from None
    return DinoAttention(model.eval())


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
