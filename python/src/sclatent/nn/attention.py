"""Attention building blocks of the exchangeable Transformer VAE (paper §2.2.2).

* `MLP`: the SwiGLU feed-forward net, out = W3(silu(W1 x) * W2 x), no biases.
* `SelfAttentionBlock`: pre-LN Transformer block T_l without a causal mask (eq. 8).
* `MCAB`: the multi-head cross-attention block (eqs. 3-7), used as a permutation-invariant pooling
  operator in the encoder (learned queries, "pseudo-inputs") and as a permutation-equivariant unpooling
  operator in the decoder (queries = gene embeddings E_I).

All attention goes through `F.scaled_dot_product_attention`. Padding tokens are masked with a key-padding
mask, so outputs do not depend on how many padding tokens a batch carries (the official code does not mask
them, see reference/scldm_official.md §3.2).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def swiglu_hidden_size(d_model: int, multiple_of: int = 4) -> int:
    """Hidden width of the SwiGLU MLP: int(8 d / 3) rounded up to a multiple of `multiple_of`."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class MLP(nn.Module):
    """SwiGLU feed-forward network without biases: out = W3(silu(W1 x) * W2 x).

    W1 and W2 are two matrices rather than one fused (2h, d) matrix split afterwards, whose backward has to
    concatenate the two gradient halves (slower on a CPU).
    """

    def __init__(self, d_model: int, hidden: int | None = None) -> None:
        super().__init__()
        self.hidden = hidden if hidden is not None else swiglu_hidden_size(d_model)
        self.w1 = nn.Linear(d_model, self.hidden, bias=False)
        self.w2 = nn.Linear(d_model, self.hidden, bias=False)
        self.w3 = nn.Linear(self.hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last dimension of `x` (..., d) -> (..., d)."""
        return self.w3(F.silu(self.w1(x)) * self.w2(x))  # (..., h) inside, (..., d) out


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, n_heads, T, d / n_heads)."""
    B, T, d = x.shape
    return x.view(B, T, n_heads, d // n_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, n_heads, T, dh) -> (B, T, n_heads * dh); a free view when x is stored in (B, T, h, dh) order."""
    B, h, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, h * dh)


def _check_heads(d_model: int, n_heads: int) -> None:
    if n_heads < 1 or d_model % n_heads != 0:
        raise ValueError(f"n_heads={n_heads} must be >= 1 and divide d_model={d_model}")


class SelfAttentionBlock(nn.Module):
    """Pre-LN Transformer block without causal mask: x + Attn(LN x), then x + MLP(LN x)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        _check_heads(d_model, n_heads)
        self.n_heads = n_heads
        self.ln_attn = nn.LayerNorm(d_model)
        self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d), key_padding_mask (B, T) bool (True = real) or None -> (B, T, d)."""
        q, k, v = self.w_qkv(self.ln_attn(x)).chunk(3, dim=-1)  # 3 x (B, T, d)
        q, k, v = (_split_heads(t, self.n_heads) for t in (q, k, v))  # (B, h, T, dh)
        attn_mask, has_keys = _attention_mask(key_padding_mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, T, dh)
        if has_keys is not None:
            out = out * has_keys.to(out.dtype)  # rows without real keys attend to nothing
        x = x + self.w_o(_merge_heads(out))  # (B, T, d)
        return x + self.mlp(self.ln_mlp(x))  # (B, T, d)


def _attention_mask(key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Turn a (B, S) key-padding mask (True = real token) into an SDPA boolean mask (B, 1, 1, S).

    A row with no real key would make the softmax 0/0 = NaN. Such rows are given all keys (so the kernel
    stays finite) and a bool multiplier `has_keys` (B, 1, 1, 1) that is False for them, so that their
    attention output becomes exactly zero ("attend to nothing"). Returns (None, None) when there is no mask.
    """
    if key_padding_mask is None:
        return None, None
    if key_padding_mask.dim() != 2 or key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a (B, S) bool tensor, got shape {tuple(key_padding_mask.shape)} "
            f"dtype {key_padding_mask.dtype}"
        )
    has_keys = key_padding_mask.any(dim=-1)  # (B,)
    mask = key_padding_mask | ~has_keys[:, None]  # (B, S)
    return mask[:, None, None, :], has_keys[:, None, None, None]


# Up to this many keys, CPU attention is two matmuls and a softmax instead of SDPA: for the decoder's hundreds of
# gene queries over m = 16 latent tokens the fused CPU kernel (tiled for long sequences) is slower; SDPA stays for
# everything else and always on CUDA.
_FEW_KEYS = 32


def scaled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh) + mask) v for q (B, h, Q, dh), k and v (B, h, S, dh) -> (B, h, Q, dh).

    SDPA, except on CPU with few keys and no mask (see _FEW_KEYS), where the explicit form is faster.
    """
    if q.device.type != "cpu" or attn_mask is not None or k.shape[-2] > _FEW_KEYS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, Q, dh)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, h, Q, S)
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, h, Q, dh)


class MCAB(nn.Module):
    """Multi-head cross-attention block (paper eqs. 3-7).

        F   = Q + Att(LN_Q(Q), K = Linear_K(LN_K(X)), V = Linear_V(LN_V(X)))
        out = F + MLP(LN_F(F))

    `Att` is multi-head attention with its own query and output projections. The paper's extra
    Q = Linear_S(S) is folded away: the queries are either learned free parameters (the encoder's
    pseudo-inputs, `n_queries` given) or learned gene embeddings passed by the caller (the decoder), so a
    linear map in front of them adds no expressiveness (the official code has none either).

    Permuting the tokens of X leaves the output unchanged (pooling); permuting the queries permutes the
    output rows (unpooling). Queries never attend to each other, so each output row depends only on its
    own query and on X.
    """

    def __init__(self, d_model: int, n_heads: int, n_queries: int | None = None) -> None:
        super().__init__()
        _check_heads(d_model, n_heads)
        if n_queries is not None and n_queries < 1:
            raise ValueError(f"n_queries must be >= 1 or None, got {n_queries}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.randn(n_queries, d_model)) if n_queries is not None else None
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(d_model)
        self.ln_v = nn.LayerNorm(d_model)
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)
        self.ln_f = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-attend `queries` to the tokens `x`.

        x: (B, S, d) tokens; key_padding_mask: (B, S) bool, True = real token, or None (all real);
        queries: (Q, d) shared by every cell, (B, Q, d) per cell, or None to use the block's learned
        queries. With `query_index` (B, Q) int64, `queries` is a table (N, d) and cell b's queries are
        its rows query_index[b]: the query path (LN_Q, projection) then runs once per table row instead of
        once per (cell, query), the same result for less work when B * Q > N (the decoder's gene
        embeddings during training, where every cell decodes its own gene subset). Returns (B, Q, d).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, S, {self.d_model}), got {tuple(x.shape)}")
        B, S, d = x.shape
        if queries is None:
            if self.queries is None:
                raise ValueError("MCAB has no learned queries (n_queries=None): pass `queries`")
            queries = self.queries  # (Q, d)
        if query_index is not None:
            if queries.dim() != 2 or queries.shape[-1] != d:
                raise ValueError(f"with query_index, queries must be an (N, {d}) table, got {tuple(queries.shape)}")
            if query_index.dim() != 2 or query_index.shape[0] != B or query_index.dtype != torch.long:
                raise ValueError(
                    f"query_index must be a ({B}, Q) int64 tensor, got {tuple(query_index.shape)} {query_index.dtype}"
                )
        elif queries.dim() not in (2, 3) or queries.shape[-1] != d or (queries.dim() == 3 and queries.shape[0] != B):
            raise ValueError(f"queries must have shape (Q, {d}) or ({B}, Q, {d}), got {tuple(queries.shape)}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape ({B}, {S}), got {tuple(key_padding_mask.shape)}")
        h, dh = self.n_heads, d // self.n_heads

        # Query path. Shared queries (Q, d) are normalised and projected once, not once per cell, and
        # broadcast over the batch with a stride-0 expand (no copy); a query table is projected once per
        # row and then gathered. Heads are split as a transposed view of (B, Q, h, dh): the CPU SDPA kernel
        # then writes its output in (B, Q, h, dh) memory order, so merging the heads back is free.
        q = self.w_q(self.ln_q(queries))  # (Q, d), (B, Q, d) or table (N, d)
        if query_index is not None:
            queries = F.embedding(query_index, queries)  # (B, Q, d)
            q = F.embedding(query_index, q)  # (B, Q, d)
        Q = queries.shape[-2]
        q = q.view(-1, Q, h, dh).expand(B, Q, h, dh).transpose(1, 2)  # (B, h, Q, dh)

        k = _split_heads(self.w_k(self.ln_k(x)), h)  # (B, h, S, dh)
        v = _split_heads(self.w_v(self.ln_v(x)), h)  # (B, h, S, dh)
        attn_mask, has_keys = _attention_mask(key_padding_mask)  # (B, 1, 1, S), (B, 1, 1, 1)
        att = scaled_attention(q, k, v, attn_mask)  # (B, h, Q, dh)
        if has_keys is not None:
            att = att * has_keys.to(att.dtype)  # empty cells attend to nothing
        f = queries + self.w_o(_merge_heads(att))  # (B, Q, d), eq. 4
        return f + self.mlp(self.ln_f(f))  # (B, Q, d), eq. 3
