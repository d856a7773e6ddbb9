"""MCAB / self-attention blocks: invariance, equivariance, padding masks, empty sets, SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sclatent.nn import attention
from sclatent.nn.attention import MCAB, MLP, SelfAttentionBlock, swiglu_hidden_size

D = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_swiglu_hidden_size_and_formula() -> None:
    assert swiglu_hidden_size(32) == 88  # official d = 32 -> 88
    assert swiglu_hidden_size(256) == 684  # official DiT width -> 684
    assert swiglu_hidden_size(16) == 44
    torch.manual_seed(0)
    mlp = MLP(D)
    x = torch.randn(3, 5, D)
    expected = (F.silu(x @ mlp.w1.weight.T) * (x @ mlp.w2.weight.T)) @ mlp.w3.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))


def test_mcab_pooling_is_invariant_to_token_permutation() -> None:
    torch.manual_seed(0)
    block = MCAB(D, 4, n_queries=6)
    x = torch.randn(3, 11, D, generator=_gen(1))
    perm = torch.randperm(11, generator=_gen(2))
    out = block(x)
    assert out.shape == (3, 6, D)
    torch.testing.assert_close(block(x[:, perm]), out, atol=1e-5, rtol=1e-5)


def test_mcab_is_exactly_invariant_to_padding_length() -> None:
    torch.manual_seed(0)
    block = MCAB(D, 4, n_queries=5)
    x = torch.randn(2, 7, D, generator=_gen(1))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False  # cell 1 has 4 real tokens
    base = block(x, key_padding_mask=mask)
    # the masked tokens' content must not matter
    x_junk = x.clone()
    x_junk[1, 4:] = 1e3 * torch.randn(3, D, generator=_gen(3))
    torch.testing.assert_close(block(x_junk, key_padding_mask=mask), base, atol=1e-5, rtol=1e-5)
    # extra padding tokens (any content) must not matter
    for extra in (1, 13):
        pad = torch.randn(2, extra, D, generator=_gen(extra))
        x_pad = torch.cat([x, pad], dim=1)
        mask_pad = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(block(x_pad, key_padding_mask=mask_pad), base, atol=1e-5, rtol=1e-5)
    # and cell 1 alone with only its real tokens gives the same result
    torch.testing.assert_close(block(x[1:, :4]), base[1:], atol=1e-5, rtol=1e-5)


def test_mcab_unpooling_is_equivariant_to_query_permutation() -> None:
    torch.manual_seed(0)
    block = MCAB(D, 2)
    z = torch.randn(4, 3, D, generator=_gen(1))
    queries = torch.randn(9, D, generator=_gen(2))
    perm = torch.randperm(9, generator=_gen(3))
    out = block(z, queries=queries)
    assert out.shape == (4, 9, D)
    torch.testing.assert_close(block(z, queries=queries[perm]), out[:, perm], atol=1e-6, rtol=1e-6)
    # each output row depends only on its own query: a subset of queries gives that subset of rows
    torch.testing.assert_close(block(z, queries=queries[2:5]), out[:, 2:5], atol=1e-6, rtol=1e-6)


def test_mcab_shared_queries_equal_per_cell_queries() -> None:
    torch.manual_seed(0)
    block = MCAB(D, 4)
    z = torch.randn(3, 5, D, generator=_gen(1))
    queries = torch.randn(8, D, generator=_gen(2))
    shared = block(z, queries=queries)
    per_cell = block(z, queries=queries.expand(3, 8, D).clone())
    torch.testing.assert_close(shared, per_cell, atol=1e-6, rtol=1e-6)


def test_mcab_empty_set_attends_to_nothing() -> None:
    torch.manual_seed(0)
    block = MCAB(D, 4, n_queries=3)
    x = torch.randn(2, 5, D, generator=_gen(1), requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False  # cell 0 is empty
    out = block(x, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    q = block.queries
    expected_empty = q + block.mlp(block.ln_f(q))  # zero attention output
    torch.testing.assert_close(out[0], expected_empty, atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[0]) == 0


def test_self_attention_block_is_permutation_equivariant_and_masks_padding() -> None:
    torch.manual_seed(0)
    block = SelfAttentionBlock(D, 4)
    x = torch.randn(2, 6, D, generator=_gen(1))
    perm = torch.randperm(6, generator=_gen(2))
    out = block(x)
    torch.testing.assert_close(block(x[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    masked = block(x, key_padding_mask=mask)
    torch.testing.assert_close(masked[1, :4], block(x[1:, :4])[0], atol=1e-5, rtol=1e-5)
    empty = block(x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert torch.isfinite(empty).all()


def test_attention_input_errors() -> None:
    with pytest.raises(ValueError, match="n_heads=3"):
        MCAB(D, 3)
    with pytest.raises(ValueError, match="n_heads=5"):
        SelfAttentionBlock(D, 5)
    block = MCAB(D, 2)
    with pytest.raises(ValueError, match="no learned queries"):
        block(torch.randn(1, 3, D))
    with pytest.raises(ValueError, match="queries"):
        block(torch.randn(2, 3, D), queries=torch.randn(3, 4, D))
    with pytest.raises(ValueError, match="key_padding_mask"):
        MCAB(D, 2, n_queries=2)(torch.randn(2, 3, D), key_padding_mask=torch.ones(2, 3))


def test_few_key_attention_matches_sdpa() -> None:
    """The explicit CPU path for few keys (the decoder's m latent tokens) is SDPA's function; gradients agree."""
    g = _gen(7)
    q = torch.randn(3, 4, 50, 8, generator=g, requires_grad=True)  # (B, h, Q, dh)
    k = torch.randn(3, 4, 16, 8, generator=g, requires_grad=True)  # (B, h, S, dh), S <= _FEW_KEYS
    v = torch.randn(3, 4, 16, 8, generator=g, requires_grad=True)
    assert k.shape[-2] <= attention._FEW_KEYS
    out = attention.scaled_attention(q, k, v, None)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mcab_query_table_with_index_equals_gathered_queries() -> None:
    """queries=table, query_index=idx gives the output of queries=table[idx], and the same gradients."""
    g = _gen(8)
    block = MCAB(D, 4)
    x = torch.randn(5, 16, D, generator=g)  # (B, S, d)
    table = torch.randn(40, D, generator=g, requires_grad=True)  # (N, d)
    idx = torch.randint(0, 40, (5, 30), generator=g)  # (B, Q)
    out = block(x, queries=table, query_index=idx)  # (B, Q, d)
    ref = block(x, queries=table[idx])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (gt,) = torch.autograd.grad(out.square().sum(), table)
    (gr,) = torch.autograd.grad(ref.square().sum(), table)
    torch.testing.assert_close(gt, gr, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="query_index must be"):
        block(x, queries=table, query_index=idx[:2])
