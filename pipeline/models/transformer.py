"""The transformer both towers share: pre-norm blocks with `scaled_dot_product_attention`.

Norms run in fp32 whatever the parameter dtype (bf16-safe); attention uses a packed q/k/v
projection like CLIP, so the weights map one-to-one onto open_clip's and Hugging Face's layouts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 whatever the towers' dtype (bf16, fp16); fp64 kept (the float64 reference tests)."""
    return x if x.dtype == torch.float64 else x.float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back: bf16 activations keep an accurate mean/variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = at_least_fp32(self.weight) if self.weight is not None else None
        bias = at_least_fp32(self.bias) if self.bias is not None else None
        return F.layer_norm(at_least_fp32(x), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to `context` (queries from x, keys and values
    from the context, through the same packed projection); `causal` masks future positions (the text tower),
    `mask` (N, 1, L, L'), True = attend) masks more (CoCa's padding)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, length, width = x.shape
        split = width // self.heads
        if context is None:
            q, k, v = self.qkv(x).view(n, length, 3, self.heads, split).permute(2, 0, 3, 1, 4)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:width], b[:width]).view(n, length, self.heads, split).transpose(1, 2)
            k, v = F.linear(context, w[width:], b[width:]).view(n, -1, 2, self.heads, split).permute(2, 0, 3, 1, 4)
        if causal and mask is not None:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, length, width))


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """GELU (erf), QuickGELU (x·σ(1.702x), OpenAI CLIP's) or GELU's tanh approximation (SigLIP's)."""
    if name == "gelu":
        return F.gelu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"activation {name!r}: expected gelu, quick_gelu or gelu_tanh")


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


def mlp_width(width: int, mlp_ratio: float) -> int:
    """The hidden width of a block's MLP (rounded: imported towers give ratios like 4304 / 1152)."""
    return round(width * mlp_ratio)


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); dropout on each residual branch."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, act: str = "gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width(width, mlp_ratio), act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), causal, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class CrossBlock(Block):
    """A block whose attention looks at a context (CoCa's image tokens): x + attn(norm(x), norm_kv(context)),
    then x + mlp(norm(x)) (open_clip's cross-attention `ResidualAttentionBlock`)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, act: str = "gelu",
                 eps: float = 1e-5):
        super().__init__(width, heads, mlp_ratio, dropout, act, eps)
        self.norm_kv = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop(self.attn(self.norm1(x), context=self.norm_kv(context)))
        return x + self.drop(self.mlp(self.norm2(x)))


class AttentionPool(nn.Module):
    """SigLIP's pooling head ("MAP"): a learned probe attends over the tokens, then x + mlp(norm(x)).

    q/k/v are packed like the blocks' attention (and `nn.MultiheadAttention`'s `in_proj`).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(width ** -0.5 * torch.randn(1, 1, width))
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width(width, mlp_ratio), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, width) tokens → (N, width)."""
        n, length, width = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(self.probe.to(x.dtype), w[:width], b[:width]).expand(n, 1, width)
        k, v = F.linear(x, w[width:], b[width:]).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, -1, self.heads, width // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(n, 1, width)
        y = self.proj(y)
        return (y + self.mlp(self.norm(y)))[:, 0]


class Transformer(nn.Module):
    """A stack of blocks; with `grad_checkpointing` each block is recomputed in the backward pass."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 causal: bool = False, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, act, eps) for _ in range(layers))
        self.reset_parameters(width, layers)

    def reset_parameters(self, width: int, layers: int) -> None:
        """CLIP-style scaled init: residual output projections shrink with depth."""
        for block in self.blocks:
            init_block(block, width, layers)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, L, width) → (N, L, width); `mask` (N, 1, L, L), True = attend, on top of the causal mask."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, mask, use_reentrant=False)
            else:
                x = block(x, self.causal, mask)
        return x


def init_block(block: Block, width: int, layers: int) -> None:
    """CLIP-style scaled init of one block: residual output projections shrink with depth."""
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
    nn.init.normal_(block.attn.proj.weight, std=proj_std)
    nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
    nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
    for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
        nn.init.zeros_(linear.bias)


class AttentionalPooler(nn.Module):
    """CoCa's pooler (open_clip's `AttentionalPooler`): `queries` learned queries (normed) attend over the normed
    tokens of width `context` with one multi-head attention of width `width`; no residual, no MLP.

    Separate q/k/v projections (the keys' width may differ from the queries'), as `nn.MultiheadAttention`
    with `kdim`/`vdim`.
    """

    def __init__(self, width: int, context: int, heads: int, queries: int, eps: float = 1e-5):
        super().__init__()
        if width % heads:
            raise ValueError(f"attentional pooler width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, width))
        self.norm_q = LayerNorm(width, eps=eps)
        self.norm_k = LayerNorm(context, eps=eps)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(context, width)
        self.v = nn.Linear(context, width)
        self.proj = nn.Linear(width, width)
        for linear in (self.q, self.k, self.v):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, context) tokens → (N, queries, width)."""
        n = x.shape[0]
        x = self.norm_k(x)
        q = self.q(self.norm_q(self.query.to(x.dtype)))
        width = q.shape[-1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], -1, self.heads, width // self.heads).transpose(1, 2)
        qh = heads(q.unsqueeze(0)).expand(n, -1, -1, -1)
        y = F.scaled_dot_product_attention(qh, heads(self.k(x)), heads(self.v(x)))
        return self.proj(y.transpose(1, 2).reshape(n, -1, width))


class MultimodalDecoder(nn.Module):
    """CoCa's captioning decoder: per layer a causal self-attention block over the text states, then a
    cross-attention block to the image tokens; a final norm and a projection onto the vocabulary (logits)."""

    def __init__(self, width: int, layers: int, heads: int, vocab_size: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, act, eps) for _ in range(layers))
        self.cross = nn.ModuleList(CrossBlock(width, heads, mlp_ratio, dropout, act, eps) for _ in range(layers))
        self.norm_final = LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, vocab_size))
        for block in (*self.blocks, *self.cross):
            init_block(block, width, layers)

    def forward(self, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(N, L_img, width) image tokens, (N, L, width) text states → (N, L, vocab) next-token logits."""
        image_tokens = image_tokens.to(text.dtype)
        for block, cross in zip(self.blocks, self.cross):
            if self.grad_checkpointing and torch.is_grad_enabled():
                text = checkpoint(block, text, True, use_reentrant=False)
                text = checkpoint(cross, text, image_tokens, use_reentrant=False)
            else:
                text = cross(block(text, True), image_tokens)
        return self.norm_final(text) @ self.proj.to(text.dtype)
