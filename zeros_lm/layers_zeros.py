"""The building blocks of the ZeroS model's layers: RMSNorm, RoPE, grouped K/V heads, the SwiGLU MLP, the
short causal convolution and the split of the fused q/k/v/u projection.

A flat sibling of modeling_zeros.py (``save_pretrained`` copies it for ``trust_remote_code``): it imports
nothing from the ``zeros_lm`` package but other flat siblings.

Shapes: B batch, T tokens, H heads, d head dimension, C channels.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_zeros import ZeroSConfig
from .ops import accumulation_dtype, as_dtype


class ZeroSRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = as_dtype(x, accumulation_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * as_dtype(xf, x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (B, T, 1, d/2) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x_j, x_{j+d/2}) of x (B, T, ..., d) by its angle: a true rotation.

    cos, sin: (B, T, 1, d/2) from rope_cos_sin, broadcast over the other dimensions of x.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = as_dtype(x, accumulation_dtype(x.dtype))
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return as_dtype(torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1), x.dtype)


L2_NORM_EPS = 1e-12  # floor of the norm in l2_normalize (F.normalize's default)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, eps) over the last dimension: F.normalize's formula and bits, without its Python
    wrapper (a few microseconds per call, paid per layer and token when decoding)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(L2_NORM_EPS)


def repeat_kv_heads(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """x with each K/V head (along ``dim``) repeated next to itself, once per query head it serves (K/V
    head j serves query heads j * groups ... (j + 1) * groups - 1); x itself when groups is 1."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def one_per_group(x: torch.Tensor, groups: int, dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`repeat_kv_heads` on a key-side tensor whose heads are equal within each group
    (a state computed from repeated K/V heads): the first head of every group, in its own storage (a
    view would keep the repeated heads' memory alive)."""
    return x if groups == 1 else x.unflatten(dim, (-1, groups)).select(dim + 1, 0).contiguous()


class ZeroSMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up share one matrix."""

    def __init__(self, config: ZeroSConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj._is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over time of width ``conv_size``, then SiLU (as in GLA, DeltaNet, Mamba).

    Applied to a mixer's projected inputs x (B, T, C) before RoPE / normalisation. Its generation state is
    the last ``conv_size - 1`` real inputs of each row (B, conv_size - 1, C): constant memory. Padding
    inputs are zeroed (left padding then reads as the zero history of an unpadded row) and never enter the
    state; with packed ``documents`` a token's window stops at its document's start.
    """

    def __init__(self, channels: int, conv_size: int):
        super().__init__()
        self.conv_size = conv_size
        self.weight = nn.Parameter(torch.empty(channels, conv_size))  # [:, -1] multiplies the current token

    def forward(self, x, *, valid=None, state=None, documents=None):
        """x (B, T, C); valid (B, T) bool or None; state (B, K - 1, C) or None. Returns y (B, T, C), new state."""
        B, T, C = x.shape
        K = self.conv_size
        if valid is not None:
            x = x * valid[:, :, None].to(x.dtype)
        history = x.new_zeros(B, K - 1, C) if state is None else state.to(x.dtype)
        window = torch.cat([history, x], dim=1)  # (B, K - 1 + T, C)
        weight = self.weight.to(x.dtype)
        y = x * weight[:, -1]
        for lag in range(1, K):
            term = window[:, K - 1 - lag : K - 1 - lag + T] * weight[:, -1 - lag]
            if documents is not None:  # only lags inside the token's own document
                term = term * (documents.position >= lag)[:, :, None].to(x.dtype)
            y = y + term
        real = torch.ones(B, K - 1 + T, dtype=torch.bool, device=x.device)
        if valid is not None:
            real[:, K - 1 :] = valid
        # the last K - 1 real inputs of each row (the history counts as real: it holds earlier real inputs)
        order = torch.where(real, torch.arange(K - 1 + T, device=x.device), -1)
        last = order.topk(K - 1, dim=1).values.flip(1)  # (B, K - 1), ascending positions
        new_state = window.gather(1, last[:, :, None].expand(B, K - 1, C))
        return F.silu(y), new_state


def split_projection(qkvu: torch.Tensor):
    """The fused projection (B, T, 4, H, d) as views of its parts qk (B, T, 2, H, d), v and u (B, T, H, d):
    through :class:`SplitProjection` when a gradient flows back, plain views otherwise (an autograd
    Function's call costs about 20 us, paid per layer and token when decoding)."""
    if torch.is_grad_enabled() and qkvu.requires_grad:
        return SplitProjection.apply(qkvu)
    return SplitProjection.forward(None, qkvu)


class SplitProjection(torch.autograd.Function):
    """The fused projection (B, T, 4, H, d) as views of its parts: qk (B, T, 2, H, d), v and u (B, T, H, d).

    The same as slicing, but the gradient comes back as one concatenation of the parts' gradients instead
    of a zero-filled buffer, a copy and an addition per part (autograd's backward of a slice).
    """

    @staticmethod
    def forward(ctx, qkvu):
        return qkvu[:, :, :2], qkvu[:, :, 2], qkvu[:, :, 3]

    @staticmethod
    def backward(ctx, d_qk, d_v, d_u):
        parts = [d_qk, d_v.unsqueeze(2) if d_v is not None else None, d_u.unsqueeze(2) if d_u is not None else None]
        shape = {0: 2, 1: 1, 2: 1}
        like = next(p for p in parts if p is not None)
        parts = [p if p is not None else like.new_zeros(*like.shape[:2], shape[i], *like.shape[3:])
                 for i, p in enumerate(parts)]
        return torch.cat(parts, dim=2)


__all__ = ["ShortConvolution", "SplitProjection", "ZeroSMLP", "ZeroSRMSNorm", "apply_rope", "l2_normalize", "one_per_group",
           "repeat_kv_heads", "rope_cos_sin", "split_projection"]
