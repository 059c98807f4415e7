"""The image and text towers: a ViT, a causal text transformer, and a pretrained Hugging Face model.

Every tower maps its input to unnormalised (N, embed_dim) features; the dual encoder normalises.
Each tower names its `stem` (what comes before the blocks) and its `blocks`, which is what locking
needs: a locked tower with `unlock_last = n` trains its last n blocks and everything after them.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.configs import HFSpec, TextSpec, TowerSpec, ViTSpec
from pipeline.models.transformer import LayerNorm, Transformer


class VisionTower(nn.Module):
    """Patches → class token + positions → pre-norm → blocks → norm → pool → projection (CLIP's ViT)."""

    stem = ("patch_embed", "cls_token", "pos_embed", "norm_pre")

    def __init__(self, spec: ViTSpec, image_size: int, embed_dim: int, dropout: float = 0.0):
        super().__init__()
        if image_size % spec.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {spec.patch_size}")
        grid = image_size // spec.patch_size
        scale = spec.width ** -0.5
        self.pool = spec.pool
        self.patch_embed = nn.Conv2d(3, spec.width, spec.patch_size, spec.patch_size, bias=False)
        self.cls_token = nn.Parameter(scale * torch.randn(spec.width))
        self.pos_embed = nn.Parameter(scale * torch.randn(grid * grid + 1, spec.width))
        self.norm_pre = LayerNorm(spec.width)
        self.transformer = Transformer(spec.width, spec.layers, spec.heads, spec.mlp_ratio, dropout)
        self.norm_post = LayerNorm(spec.width)
        self.proj = nn.Parameter(scale * torch.randn(spec.width, embed_dim))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.norm_pre(torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype))
        x = self.norm_post(self.transformer(x))
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return pooled @ self.proj


class TextTower(nn.Module):
    """Tokens + positions → causal blocks → norm → the end token's state → projection.

    The end token is the largest token id (so `argmax` finds it, as in open_clip); everything after it
    is padding that the causal mask keeps from influencing it.
    """

    stem = ("token_embed", "pos_embed")

    def __init__(self, spec: TextSpec, context_length: int, vocab_size: int, embed_dim: int, dropout: float = 0.0):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, spec.width)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(context_length, spec.width))
        self.transformer = Transformer(spec.width, spec.layers, spec.heads, spec.mlp_ratio, dropout, causal=True)
        self.norm_final = LayerNorm(spec.width)
        self.proj = nn.Parameter(spec.width ** -0.5 * torch.randn(spec.width, embed_dim))
        nn.init.normal_(self.token_embed.weight, std=0.02)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]].to(self.token_embed.weight.dtype)
        x = self.norm_final(self.transformer(x))
        end = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), end] @ self.proj


class HFTower(nn.Module):
    """A Hugging Face encoder (text: `input_ids`, padding `pad_id` masked; image: `pixel_values`), pooled
    (first token, masked mean, or last non-padding token) and projected by a new linear layer
    (`embed_dim` 0: no projection, the pooled hidden state is the feature)."""

    stem = ("model.embeddings",)

    def __init__(self, spec: HFSpec, embed_dim: int, modality: str, pad_id: int = 0):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        raw = dict(spec.config)
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        self.modality = modality
        self.pool = spec.pool
        self.pad_id = pad_id
        self.model = AutoModel.from_config(config)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None       # an unused head (BERT, ViT): no parameters without gradients
        self.proj = nn.Linear(config.hidden_size, embed_dim, bias=False) if embed_dim else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=config.hidden_size ** -0.5)
        self.block_prefix = "model." + _find_blocks(self.model, config.num_hidden_layers)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.block_prefix)

    @torch.no_grad()
    def load_pretrained(self, path: str) -> None:
        """Copy the weights of the local model directory `path` into this tower (strict)."""
        from transformers import AutoModel

        pretrained = AutoModel.from_pretrained(path, local_files_only=True)
        missing, unexpected = self.model.load_state_dict(pretrained.state_dict(), strict=False)
        unexpected = [k for k in unexpected if not k.startswith("pooler.")]
        if missing or unexpected:
            raise ValueError(f"pretrained tower {path}: weights do not fit its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    def set_grad_checkpointing(self, enabled: bool) -> None:
        # transformers 5 renamed gradient_* to activation_checkpointing_*; older versions have only the first
        new = hasattr(self.model, "activation_checkpointing_enable")
        if enabled:
            kwargs = {"use_reentrant": False}
            if new:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            (self.model.activation_checkpointing_disable if new else self.model.gradient_checkpointing_disable)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality == "text":
            mask = (x != self.pad_id).long()
            hidden = self.model(input_ids=x, attention_mask=mask).last_hidden_state
        else:
            mask = None
            hidden = self.model(pixel_values=x.to(next(self.parameters()).dtype)).last_hidden_state
        if self.pool == "cls":
            pooled = hidden[:, 0]
        elif self.pool == "last":
            last = (mask.sum(dim=1) - 1).clamp(min=0) if mask is not None else hidden.new_full((len(x),), -1).long()
            pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]
        elif mask is None:
            pooled = hidden.mean(dim=1)
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return pooled if self.proj is None else self.proj(pooled.to(self.proj.weight.dtype))


def _find_blocks(model: nn.Module, layers: int) -> str:
    """The name of the ModuleList of transformer layers in a Hugging Face model (e.g. `encoder.layer`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return name
    raise ValueError(f"{type(model).__name__}: found no list of {layers} transformer layers to lock or unlock")


def read_hf_spec(path: str, section: str, pool: str) -> HFSpec:
    """The spec of the local Hugging Face model folder `path` (config only, no weights) with this pooling;
    `section` (e.g. ``model.text``) names the config key in errors."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{section}.hf_path = {path!r}: not a readable Hugging Face model directory ({e})") from None
    return HFSpec(config=config.to_dict(), pool=pool, source=str(path))


def block_prefix(tower: nn.Module) -> str:
    return getattr(tower, "block_prefix", "transformer.blocks")


def freeze(tower: nn.Module, unlock_last: int, what: str) -> None:
    """Freeze a tower (LiT) but its last `unlock_last` blocks and what follows them (final norm, projection).
    `what` names its config section in errors (e.g. ``model.text``)."""
    blocks, prefix = len(tower.blocks), block_prefix(tower) + "."
    if not 0 <= unlock_last <= blocks:
        raise ValueError(f"{what}.unlock_last = {unlock_last}: expected 0..{blocks} (the tower's blocks)")
    for pname, p in tower.named_parameters():
        if pname.startswith(prefix):
            trainable = int(pname[len(prefix):].split(".")[0]) >= blocks - unlock_last
        elif pname.startswith(tower.stem):
            trainable = False
        else:                                         # the head: final norm, projection
            trainable = unlock_last > 0
        p.requires_grad_(trainable)


def build_tower(spec: TowerSpec, modality: str, *, image_size: int, context_length: int, vocab_size: int,
                embed_dim: int, dropout: float) -> nn.Module:
    if isinstance(spec, HFSpec):
        tower_vocab = spec.config.get("vocab_size")
        if modality == "text" and tower_vocab is not None and vocab_size > tower_vocab:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the pretrained text tower {spec.source or ''} "
                             f"knows {tower_vocab}: set data.tokenizer to that model's tokenizer.json")
        return HFTower(spec, embed_dim, modality)
    if modality == "image" and isinstance(spec, ViTSpec):
        return VisionTower(spec, image_size, embed_dim, dropout)
    if modality == "text" and isinstance(spec, TextSpec):
        return TextTower(spec, context_length, vocab_size, embed_dim, dropout)
    raise ValueError(f"a {spec.kind!r} tower cannot encode {modality}")
