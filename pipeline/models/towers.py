"""The image and text towers: a ViT, a causal text transformer, and a pretrained Hugging Face model.

Every tower maps its input to unnormalised (N, embed_dim) features; the dual encoder normalises.
Each tower names its `stem` (what comes before the blocks) and its `blocks`, which is what locking
needs: a locked tower with `unlock_last = n` trains its last n blocks and everything after them.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from pipeline.models.configs import HFSpec, TextSpec, TowerSpec, ViTSpec
from pipeline.models.transformer import AttentionalPooler, AttentionPool, LayerNorm, Transformer

TowerOutput = Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]   # features, or (features, tokens)


class PatchDropout(nn.Module):
    """In training, keep a random (1 − p) of each image's patch tokens (FLIP: Li et al. 2023, "Scaling
    Language-Image Pre-training via Masking"); the first `keep_first` tokens (the class token) always stay.

    The kept patches are drawn per image from the default generator of the tokens' device: the one
    whose state the gradient cache saves before each call and restores for its replay, so the replay
    keeps the same patches. The identity in eval mode and at p = 0.
    """

    def __init__(self, p: float, keep_first: int = 1):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"patch dropout p = {p}: expected a fraction in [0, 1)")
        self.p, self.keep_first = p, keep_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F + L, D) first tokens and patches → (N, F + max(1, int(L (1 − p))), D)."""
        if not self.training or self.p == 0.0:
            return x
        first, (n, length, width) = self.keep_first, x.shape
        length -= first
        keep = max(1, int(length * (1.0 - self.p)))
        kept = torch.rand(n, length, device=x.device).topk(keep, dim=1).indices + first
        return torch.cat([x[:, :first], x.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))], dim=1)


class VisionTower(nn.Module):
    """Patches (+ class token) + positions → patch dropout (training) → pre-norm → blocks → norm → pool →
    projection (CLIP's ViT).

    The spec's variants (`ViTSpec`) switch parts off or swap them: no class token / pre-norm /
    projection, a patch bias, fixed sin-cos positions (a buffer, saved with the weights), mean or
    attention pooling.
    """

    stem = ("patch_embed", "cls_token", "pos_embed", "norm_pre")

    def __init__(self, spec: ViTSpec, image_size: int, embed_dim: int, dropout: float = 0.0,
                 patch_dropout: float = 0.0):
        super().__init__()
        if image_size % spec.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {spec.patch_size}")
        coca = spec.pool == "coca"
        if not spec.proj and (spec.width != embed_dim or coca):
            raise ValueError(f"an image tower without projection has width {spec.width}, not the embedding size "
                             f"{embed_dim}")
        grid = image_size // spec.patch_size
        scale = spec.width ** -0.5
        self.pool = spec.pool
        self.patch_embed = nn.Conv2d(3, spec.width, spec.patch_size, spec.patch_size, bias=spec.patch_bias)
        self.cls_token = nn.Parameter(scale * torch.randn(spec.width)) if spec.class_token else None
        tokens = grid * grid + int(spec.class_token)
        if spec.positions == "sincos":
            self.register_buffer("pos_embed", sincos_positions(spec.width, grid, spec.class_token))
        else:
            self.pos_embed = nn.Parameter(scale * torch.randn(tokens, spec.width))
        self.patch_dropout = PatchDropout(patch_dropout, keep_first=int(spec.class_token))
        self.norm_pre = LayerNorm(spec.width, eps=spec.eps) if spec.norm_pre else nn.Identity()
        self.transformer = Transformer(spec.width, spec.layers, spec.heads, spec.mlp_ratio, dropout,
                                       act=spec.act, eps=spec.eps)
        pooled = embed_dim if coca else spec.width          # CoCa's pooler outputs the embedding size
        self.norm_post = LayerNorm(pooled, eps=spec.eps)
        if coca:
            if spec.pool_queries < 2:
                raise ValueError(f"CoCa pooling needs at least 2 queries (the pooled one and image tokens), "
                                 f"got {spec.pool_queries}")
            self.attn_pool = AttentionalPooler(embed_dim, spec.width, spec.pool_heads, spec.pool_queries, spec.eps)
        else:
            self.attn_pool = (AttentionPool(spec.width, spec.heads, spec.mlp_ratio, spec.act, spec.eps)
                              if spec.pool == "map" else None)
        self.proj = nn.Parameter(pooled ** -0.5 * torch.randn(pooled, embed_dim)) if spec.proj else None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def forward(self, images: torch.Tensor, with_tokens: bool = False) -> TowerOutput:
        """The features; with `with_tokens` (CoCa) `forward_tokens`' pair, through the module's call, so that a
        compiled tower (`torch.compile`) and DeepSpeed's module hooks serve the decoder's forward too."""
        out = self.forward_tokens(images)
        return out if with_tokens else out[0]

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the (N, embed_dim) features, CoCa's (N, queries − 1, embed_dim) image tokens or None)."""
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.norm_pre(self.patch_dropout(x + self.pos_embed.to(x.dtype)))
        x = self.transformer(x)
        if self.pool == "coca":                          # open_clip's CoCa: pool, then norm; query 0 is pooled
            x = self.norm_post(self.attn_pool(x))
            return x[:, 0] @ self.proj.to(x.dtype), x[:, 1:]
        x = self.norm_post(x)
        if self.pool == "map":
            pooled = self.attn_pool(x)
        elif self.pool == "cls":
            pooled = x[:, 0]
        else:
            pooled = x[:, int(self.cls_token is not None):].mean(dim=1)
        return (pooled @ self.proj if self.proj is not None else pooled), None


def sincos_positions(width: int, grid: int, class_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE's, open_clip's `sin_cos_2d`): half the channels encode the column,
    half the row, each as [sin, cos] of position·10000^(-2i/d); a zero row for the class token."""
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    table = torch.cat([encode(cols), encode(rows)], dim=1)
    if class_token:
        table = torch.cat([torch.zeros(1, width, dtype=table.dtype), table])
    return table.float()


class TextTower(nn.Module):
    """Tokens + positions → blocks → norm → one position's state → projection.

    CLIP's tower is causal and pools the end token, found as the largest token id (`argmax`, as in
    open_clip) or as the first `eos_id`; with the causal mask, padding after it cannot influence it.
    SigLIP's is bidirectional and pools the last position, through a projection with a bias.
    CoCa's (`appended`) appends a learned class token `cls_token` after the caption (one more position)
    and pools it; `forward_tokens` also gives the caption's token states for the decoder.
    """

    stem = ("token_embed", "pos_embed", "cls_token")

    def __init__(self, spec: TextSpec, context_length: int, vocab_size: int, embed_dim: int, dropout: float = 0.0):
        super().__init__()
        if spec.pool == "eos" and spec.eos_id is None:
            raise ValueError("a text tower pooled at `eos` needs its eos_id")
        self.pool, self.eos_id, self.pad_id = spec.pool, spec.eos_id, spec.pad_id
        appended = spec.pool == "appended"
        if appended and not spec.causal:
            raise ValueError("a text tower with an appended class token is causal (CoCa's)")
        self.token_embed = nn.Embedding(vocab_size, spec.width)
        self.cls_token = nn.Parameter(0.01 * torch.randn(spec.width)) if appended else None
        self.pos_embed = nn.Parameter(0.01 * torch.randn(context_length + int(appended), spec.width))
        self.transformer = Transformer(spec.width, spec.layers, spec.heads, spec.mlp_ratio, dropout,
                                       causal=spec.causal, act=spec.act, eps=spec.eps)
        self.norm_final = LayerNorm(spec.width, eps=spec.eps)
        self.proj = nn.Parameter(spec.width ** -0.5 * torch.randn(spec.width, embed_dim))
        self.proj_bias = nn.Parameter(torch.zeros(embed_dim)) if spec.proj_bias else None
        nn.init.normal_(self.token_embed.weight, std=0.02)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def forward(self, tokens: torch.Tensor, with_tokens: bool = False) -> TowerOutput:
        """The features; with `with_tokens` (CoCa) `forward_tokens`' pair (see the image tower's `forward`)."""
        out = self.forward_tokens(tokens)
        return out if with_tokens else out[0]

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the (N, embed_dim) features, CoCa's (N, L, width) token states (unnormed) or None)."""
        x = self.token_embed(tokens)
        if self.cls_token is not None:
            return self._appended(tokens, x)
        x = x + self.pos_embed[: tokens.shape[1]].to(x.dtype)
        x = self.norm_final(self.transformer(x))
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool == "argmax":
            pooled = x[rows, tokens.argmax(dim=-1)]
        elif self.pool == "eos":
            pooled = x[rows, (tokens == self.eos_id).int().argmax(dim=-1)]
        else:
            pooled = x[:, 0] if self.pool == "first" else x[:, -1]
        return self._project(pooled), None

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        out = pooled @ self.proj.to(pooled.dtype)
        return out + self.proj_bias.to(out.dtype) if self.proj_bias is not None else out

    def _appended(self, tokens: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCa: the class token after the caption, causal attention with padding keys masked, the class
        token's state normed and projected. The mask is open_clip's CoCa mask as its public weights were
        trained with: key j ≥ 1 is open when token j − 1 is not padding (key 0 always)."""
        n, length = tokens.shape
        x = torch.cat([x, self.cls_token.to(x.dtype).expand(n, 1, -1)], dim=1)
        x = x + self.pos_embed[: length + 1].to(x.dtype)
        keys = torch.cat([tokens.new_ones(n, 1, dtype=torch.bool), tokens != self.pad_id], dim=1)
        x = self.transformer(x, keys[:, None, None, :])
        return self._project(self.norm_final(x[:, -1])), x[:, :-1]


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
                embed_dim: int, dropout: float, patch_dropout: float = 0.0) -> nn.Module:
    """The tower of `spec` for `modality`; `patch_dropout` applies to the built-in ViT only."""
    if patch_dropout and not (modality == "image" and isinstance(spec, ViTSpec)):
        raise ValueError(f"patch dropout {patch_dropout}: only the built-in ViT image tower drops patches, "
                         f"not a {spec.kind!r} {modality} tower")
    if isinstance(spec, HFSpec):
        tower_vocab = spec.config.get("vocab_size")
        if modality == "text" and tower_vocab is not None and vocab_size > tower_vocab:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the pretrained text tower {spec.source or ''} "
                             f"knows {tower_vocab}: set data.tokenizer to that model's tokenizer.json")
        return HFTower(spec, embed_dim, modality)
    if modality == "image" and isinstance(spec, ViTSpec):
        return VisionTower(spec, image_size, embed_dim, dropout, patch_dropout)
    if modality == "text" and isinstance(spec, TextSpec):
        return TextTower(spec, context_length, vocab_size, embed_dim, dropout)
    raise ValueError(f"a {spec.kind!r} tower cannot encode {modality}")
