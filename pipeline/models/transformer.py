"""The transformer both towers share: pre-norm blocks with `scaled_dot_product_attention`.

Norms run in fp32 whatever the parameter dtype (bf16-safe); attention uses a packed q/k/v
projection like CLIP, so the weights map one-to-one onto open_clip's and Hugging Face's layouts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back: bf16 activations keep an accurate mean/variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention; `causal` masks future positions (the text tower)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
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

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), causal))
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
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, width) → (N, L, width)."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, self.causal)
        return x
