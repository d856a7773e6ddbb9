"""DiT: the Diffusion Transformer that parameterises the latent flow-matching prior (paper §2.2.2, §2.2.4).

The network maps a noisy latent ``x_t`` (B, m, d_latent), a time ``t`` in [0, 1] and one label code per condition
key to a velocity of the same shape as ``x_t``. Conditioning is global: ``c = t_emb + sum_k E_k[label_k]`` drives
adaLN-Zero modulation in every block. Every table ``E_k`` has one extra row, the *null* token (index
``n_classes[k]``), used for classifier-free guidance; :func:`drop_labels` replaces labels by it during training.

Shapes: ``B`` samples, ``m`` latent tokens, ``dl`` latent width, ``d`` model width, ``K`` condition keys.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sclatent.nn.attention import MLP, scaled_attention, swiglu_hidden_size

logger = logging.getLogger(__name__)

# name -> (d_model, n_blocks, n_heads). "default" is the paper's / official code's DiT (about 9.7 M parameters).
_PRESETS: dict[str, tuple[int, int, int]] = {"default": (256, 8, 8), "tiny": (64, 2, 4)}


@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`DiT`.

    ``n_classes[k]`` is the number of categories of condition key k (the null code of key k is ``n_classes[k]``).
    """

    d_latent: int
    n_tokens: int
    d_model: int = 256
    n_blocks: int = 8
    n_heads: int = 8
    n_classes: list[int] = field(default_factory=list)
    t_freq_dim: int = 256  # number of sinusoidal features of t before the timestep MLP
    mlp_multiple_of: int = 4  # SwiGLU hidden width is rounded up to a multiple of this
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.n_classes = [int(n) for n in self.n_classes]
        for name in ("d_latent", "n_tokens", "d_model", "n_blocks", "n_heads", "t_freq_dim", "mlp_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"DiTConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2 != 0:
            raise ValueError(f"DiTConfig.d_model={self.d_model} must be even (sin-cos positional table)")
        if self.t_freq_dim % 2 != 0:
            raise ValueError(f"DiTConfig.t_freq_dim={self.t_freq_dim} must be even")
        for k, n in enumerate(self.n_classes):
            if n < 1:
                raise ValueError(f"DiTConfig.n_classes[{k}]={n}: every condition key needs at least one category")
        if not self.norm_eps > 0:
            raise ValueError(f"DiTConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def null_codes(self) -> list[int]:
        """The null (unconditional) code of every condition key: ``n_classes[k]``."""
        return list(self.n_classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the configuration (for checkpoint sidecars)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown DiTConfig keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, d_latent: int, n_tokens: int, n_classes: list[int]) -> DiTConfig:
        """A named size: ``"default"`` (d_model 256, 8 blocks, 8 heads) or ``"tiny"`` (64, 2, 4)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(_PRESETS)}")
        d_model, n_blocks, n_heads = _PRESETS[name]
        return cls(
            d_latent=d_latent,
            n_tokens=n_tokens,
            d_model=d_model,
            n_blocks=n_blocks,
            n_heads=n_heads,
            n_classes=list(n_classes),
        )


def sincos_positions(n_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sin-cos table (n_positions, dim): ``[sin(p w_i) || cos(p w_i)]``, ``w_i = 10000^(-i/(dim/2))``."""
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)  # (half,)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * omega[None, :]  # (P, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()  # (P, dim)


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of t (B,) -> (B, dim): ``[cos(t f_i) || sin(t f_i)]``, ``f_i = exp(-ln(1e4) i/(dim/2))``.

    t is used as given in [0, 1] (as in SiT and the official scLDM code), not rescaled to [0, 1000].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the m latent tokens (no mask: every sample has all m tokens).

    Its own sublayer, not ``attention.SelfAttentionBlock``: adaLN-Zero needs to modulate the input and gate the
    output of the attention itself, which a complete pre-LN block does not expose.
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, m, d = x.shape  # (B, m, d)
        qkv = self.qkv(x).view(b, m, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, m, d/H)
        out = scaled_attention(q, k, v, None)  # (B, H, m, d/H); explicit matmuls on CPU for m <= 32 keys
        return self.proj(out.transpose(1, 2).reshape(b, m, d))  # (B, m, d)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; x (B, m, d), shift/scale (B, d)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """Pre-LN Transformer block with adaLN-Zero: shift/scale/gate of both sublayers come from Linear(SiLU(c))."""

    def __init__(self, dim: int, n_heads: int, multiple_of: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = SelfAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.mlp = MLP(dim, hidden=swiglu_hidden_size(dim, multiple_of))  # SwiGLU, shared with the VAE
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x (B, m, d), c (B, d)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).chunk(6, dim=1)  # each (B, d)
        x = x + gate1[:, None, :] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None, :] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x  # (B, m, d)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by Linear(d -> d_latent)."""

    def __init__(self, dim: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, d_out)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaln(c).chunk(2, dim=1)  # each (B, d)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, m, d_out)


class DiT(nn.Module):
    """Diffusion Transformer velocity field ``v(x_t, t, labels)`` over m latent tokens.

    ``forward(x_t (B, m, dl), t (B,), labels (B, K) long) -> (B, m, dl)``; label ``n_classes[k]`` in column k is
    the null token of key k. The output is exactly zero at initialisation (adaLN-Zero, zero final projection).
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.input_proj = nn.Linear(config.d_latent, d)
        self.register_buffer("pos_embed", sincos_positions(config.n_tokens, d), persistent=False)  # (m, d)
        self.t_mlp = nn.Sequential(nn.Linear(config.t_freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        # one table per condition key, with the null token as the extra last row
        self.label_embeds = nn.ModuleList(nn.Embedding(n + 1, d) for n in config.n_classes)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.n_heads, config.mlp_multiple_of, config.norm_eps) for _ in range(config.n_blocks)
        )
        self.final = FinalLayer(d, config.d_latent, config.norm_eps)
        self.register_buffer("null_codes", torch.tensor(config.null_codes, dtype=torch.long), persistent=False)  # (K,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: Xavier Linear weights, zero biases, N(0, 0.02) for label tables and the t-MLP,
        then zero for every adaLN projection and the final Linear (so the network starts as v = 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for table in self.label_embeds:
            nn.init.normal_(table.weight, std=0.02)
        for layer in self.t_mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaln[-1].weight)
            nn.init.zeros_(block.adaln[-1].bias)
        nn.init.zeros_(self.final.adaln[-1].weight)
        nn.init.zeros_(self.final.adaln[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def check_labels(self, labels: Tensor, batch_size: int) -> None:
        """Raise ValueError unless labels is a (batch_size, K) integer tensor with codes in [0, n_classes[k]]."""
        k = len(self.config.n_classes)
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != (batch_size, k):
            raise ValueError(f"labels must have shape ({batch_size}, {k}), got {tuple(labels.shape)}")
        if k and bool(((labels < 0) | (labels > self.null_codes)).any()):
            bad = [(j, int(labels[:, j].min()), int(labels[:, j].max())) for j in range(k)]
            raise ValueError(
                f"label codes out of range: (key, min, max) = {bad}, allowed [0, n_classes] = {self.config.n_classes}"
            )

    def condition(self, t: Tensor, labels: Tensor) -> Tensor:
        """Conditioning vector ``c = MLP(sinusoid(t)) + sum_k E_k[labels[:, k]]``: t (B,), labels (B, K) -> (B, d)."""
        features = timestep_features(t, self.config.t_freq_dim).to(self.t_mlp[0].weight.dtype)  # (B, F)
        c = self.t_mlp(features)  # (B, d)
        for k, table in enumerate(self.label_embeds):
            c = c + table(labels[:, k])
        return c

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """Velocity at (x_t, t) given labels: x_t (B, m, dl), t (B,), labels (B, K) long -> (B, m, dl)."""
        cfg = self.config
        if x_t.ndim != 3 or x_t.shape[1:] != (cfg.n_tokens, cfg.d_latent):
            raise ValueError(f"x_t must have shape (B, {cfg.n_tokens}, {cfg.d_latent}), got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        self.check_labels(labels, b)
        h = self.input_proj(x_t) + self.pos_embed[None]  # (B, m, d)
        c = self.condition(t, labels)  # (B, d)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)  # (B, m, dl)


def null_labels(labels: Tensor, config: DiTConfig) -> Tensor:
    """A tensor like labels (B, K) holding every key's null code (the fully unconditional request)."""
    k = len(config.n_classes)
    if labels.ndim != 2 or labels.shape[1] != k:
        raise ValueError(f"labels must have shape (B, {k}), got {tuple(labels.shape)}")
    nulls = torch.tensor(config.null_codes, dtype=labels.dtype, device=labels.device)  # (K,)
    return nulls.expand_as(labels).clone()


DROPOUT_SCHEMES = ("independent", "shared")


def drop_labels(
    labels: Tensor, config: DiTConfig, rho: float, generator: torch.Generator, scheme: str = "independent"
) -> Tensor:
    """Classifier-free-guidance label dropout, (B, K) -> (B, K). "independent": each label (every sample, every
    key) is replaced by its key's null code independently with probability rho, so the model sees every subset of
    attributes; "shared": all labels of a sample are dropped together with probability rho (the authors' code)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"label-dropout probability rho must be in [0, 1], got {rho!r}")
    if scheme not in DROPOUT_SCHEMES:
        raise ValueError(f"unknown label-dropout scheme {scheme!r}; choose one of {DROPOUT_SCHEMES}")
    nulls = null_labels(labels, config)  # (B, K)
    shape = labels.shape if scheme == "independent" else (labels.shape[0], 1)
    # draw on the generator's device, then move: keeps a CPU generator usable for GPU tensors
    u = torch.rand(shape, generator=generator, device=generator.device).to(labels.device)  # (B, K) or (B, 1)
    return torch.where(u < rho, nulls, labels)
