"""The exchangeable Transformer VAE (paper §2.2.1-2.2.3; official-code facts in reference/scldm_official.md).

    tokens (gene id, count) --TokenEmbedding--> (B, S, d) --MCABEncoder--> Z (B, m, d_latent)
    Z --MCABDecoder(queries = gene embeddings E_I)--> (B, Q, d) --LikelihoodHead--> p(x_I | Z, I)

One gene embedding table E (G + 1 rows, row 0 = PAD) is the encoder's gene identity and the decoder's queries.
Count likelihoods take their mean as softmax(logits over the decoded genes) * L.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MCAB, SelfAttentionBlock
from .likelihoods import Gaussian, Likelihood, NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

LIKELIHOODS = ("nb", "zinb", "poisson", "gaussian")
EMBEDDINGS = ("concat", "multiplicative", "gene_count")
THETA_INIT = 1.0  # log theta at initialisation (theta = e, as in the official code)


@dataclass
class VAEConfig:
    """Architecture and objective of the Transformer VAE (the dataclass defaults are the paper's model)."""

    n_genes: int  # G: vocabulary size (gene ids 1..G, 0 = padding)
    d_model: int = 32  # width of every attention block
    n_latent_tokens: int = 16  # m: latent tokens per cell
    d_latent: int = 16  # width of a latent token
    n_enc_blocks: int = 8  # self-attention blocks over the m tokens in the encoder
    n_dec_blocks: int = 8  # ... and in the decoder
    n_heads: int = 8  # heads of those blocks
    n_cross_heads: int = 4  # heads of the two MCABs
    embedding: str = "concat"  # "concat" (eq. 9), "multiplicative" (official code), "gene_count" (concat + U_g)
    likelihood: str = "nb"  # "nb", "zinb", "poisson" or "gaussian" (on log1p(1e4 x / L))
    beta: float = 0.0  # KL weight: 0 = deterministic encoder (official code), > 0 = beta-VAE
    gene_head: bool = False  # per-gene readout w_g . o_g added to the decoder's shared head
    count_readout: int = 0  # k > 0: linear readout sum_g log1p(x_g) R_g beside the MCAB pooling
    readout_dropout: float = 0.0  # training-time probability of leaving a token out of that readout

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; expected one of {LIKELIHOODS}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {self.embedding!r}; expected one of {EMBEDDINGS}")
        sizes = (
            "n_genes",
            "d_model",
            "n_latent_tokens",
            "d_latent",
            "n_heads",
            "n_cross_heads",
            "n_enc_blocks",
            "n_dec_blocks",
            "count_readout",
        )
        for i, name in enumerate(sizes):
            value, least = getattr(self, name), 1 if i < 6 else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be {'a positive' if least else 'a non-negative'} integer, got {value!r}")
        for name in ("n_heads", "n_cross_heads"):
            if self.d_model % getattr(self, name) != 0:
                raise ValueError(f"{name}={getattr(self, name)} must divide d_model={self.d_model}")
        if not (isinstance(self.readout_dropout, (int, float)) and 0 <= self.readout_dropout < 1):
            raise ValueError(f"readout_dropout must be in [0, 1), got {self.readout_dropout!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")

    @property
    def variational(self) -> bool:
        """Gaussian posterior with a KL term (beta > 0), else the deterministic encoder."""
        return self.beta > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError naming them."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown VAEConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, n_genes: int, **overrides: Any) -> VAEConfig:
        """Named configurations (see PRESETS); `overrides` replace single fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(n_genes=n_genes, **{**PRESETS[name], **overrides})


# "scldm": the authors' model as released (official sizes, E_g * log1p(x) tokens, deterministic encoder).
# "default": the official sizes plus the per-gene additions adopted by measurement (docs/decisions/).
# "tiny": a small model for tests and the CPU demo, with the default's additions.
_ADDITIONS = dict(embedding="gene_count", gene_head=True, count_readout=64, readout_dropout=0.2)
PRESETS: dict[str, dict[str, Any]] = {
    "scldm": dict(embedding="multiplicative"),
    "default": _ADDITIONS,
    "tiny": {
        **_ADDITIONS,
        "count_readout": 4,
        "d_model": 16,
        "n_latent_tokens": 4,
        "d_latent": 4,
        "n_heads": 2,
        "n_cross_heads": 2,
        "n_enc_blocks": 1,
        "n_dec_blocks": 1,
    },
}


class TokenEmbedding(nn.Module):
    """Embedding(x_I, I) of eq. 9 and its variants: gene ids (B, S) and raw counts (B, S) -> tokens (B, S, d).

    concat:         Linear(repeat_d(c) || E_g) with c = log1p(x), computed as c W_c 1 + (W_e E_g + b);
    gene_count:     concat + c U_g, a learned per-gene count direction (zero at initialisation);
    multiplicative: E_g * c (official code; MCAB's LayerNorms cancel the scale, so counts barely reach Z).
    """

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.kind = c.embedding
        self.genes = nn.Embedding(c.n_genes + 1, c.d_model)  # E, row 0 = PAD
        self.proj = nn.Linear(2 * c.d_model, c.d_model) if c.embedding != "multiplicative" else None
        self.count_dir = nn.Embedding(c.n_genes + 1, c.d_model) if c.embedding == "gene_count" else None

    def forward(self, genes: Tensor, counts: Tensor) -> Tensor:
        c = torch.log1p(counts).to(self.genes.weight.dtype)[..., None]  # (B, S, 1)
        if self.proj is None:
            return self.genes(genes) * c  # (B, S, d)
        d = self.genes.embedding_dim
        # W [c 1_d ; E_g] + b without the (B, S, 2d) concatenation: the gene half is projected once per table row
        table = F.linear(self.genes.weight, self.proj.weight[:, d:], self.proj.bias)  # (G + 1, d)
        direction = self.proj.weight[:, :d].sum(dim=1)  # (d,)
        if self.count_dir is not None:
            direction = direction + self.count_dir(genes)  # (B, S, d)
        return F.embedding(genes, table) + c * direction  # (B, S, d)


class CountReadout(nn.Module):
    """s = sum over a cell's real tokens of log1p(x_g) R_g (B, k), mapped into the m pooled tokens (zero at init).

    MCAB pooling is a softmax-weighted average of layer-normalised tokens and keeps neither the cell's depth nor
    the level of its top genes; a sum does. In training each token is left out with probability `dropout` (the
    rest scaled by 1 / (1 - p)), drawn from the caller's generator so that runs are seeded and resumable.
    """

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.dropout = c.readout_dropout
        self.table = nn.Embedding(c.n_genes + 1, c.count_readout)  # R_g
        self.proj = nn.Linear(c.count_readout, c.n_latent_tokens * c.d_model, bias=False)

    def forward(self, genes: Tensor, counts: Tensor, mask: Tensor, generator: torch.Generator | None) -> Tensor:
        w = torch.log1p(counts.to(torch.float32)) * mask  # (B, S); padding weighs 0
        if self.training and self.dropout > 0:
            device = generator.device if generator is not None else w.device
            u = torch.rand(w.shape, generator=generator, device=device).to(w.device)  # (B, S)
            w = w * (u >= self.dropout) / (1.0 - self.dropout)
        r = self.table(genes)  # (B, S, k)
        s = torch.einsum("bs,bsk->bk", w.to(r.dtype), r)  # (B, k)
        return self.proj(s)  # (B, m * d)


class MCABEncoder(nn.Module):
    """Eq. 8: MCAB pooling of the tokens into m learned queries, self-attention blocks, the latent head.

    Deterministic (beta = 0): Z = LayerNorm_noaffine(Linear(h)) (official code). Variational: mu and logvar heads.
    """

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.pool = MCAB(c.d_model, c.n_cross_heads, n_queries=c.n_latent_tokens)
        self.readout = CountReadout(c) if c.count_readout else None
        self.blocks = nn.ModuleList(SelfAttentionBlock(c.d_model, c.n_heads) for _ in range(c.n_enc_blocks))
        self.norm = nn.LayerNorm(c.d_model)
        self.to_mu = nn.Linear(c.d_model, c.d_latent)
        self.to_logvar = nn.Linear(c.d_model, c.d_latent) if c.variational else None

    def forward(
        self, tokens: Tensor, genes: Tensor, counts: Tensor, mask: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        h = self.pool(tokens, key_padding_mask=mask)  # (B, m, d)
        if self.readout is not None:
            h = h + self.readout(genes, counts, mask, generator).view(h.shape).to(h.dtype)
        for block in self.blocks:
            h = block(h)  # (B, m, d)
        h = self.norm(h)
        mu = self.to_mu(h)  # (B, m, d_latent)
        if self.to_logvar is not None:
            return mu, self.to_logvar(h)
        return F.layer_norm(mu, mu.shape[-1:]), None


class MCABDecoder(nn.Module):
    """Eq. 10: latent tokens -> self-attention blocks -> MCAB unpooling whose queries are the genes' embeddings."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.standardise = not c.variational  # re-standardise latents (e.g. those the prior generates)
        self.proj = nn.Linear(c.d_latent, c.d_model)
        self.blocks = nn.ModuleList(SelfAttentionBlock(c.d_model, c.n_heads) for _ in range(c.n_dec_blocks))
        self.unpool = MCAB(c.d_model, c.n_cross_heads)

    def forward(self, z: Tensor, gene_table: Tensor, query_genes: Tensor) -> Tensor:
        h = F.layer_norm(z, z.shape[-1:]) if self.standardise else z  # (B, m, d_latent)
        h = self.proj(h)  # (B, m, d)
        for block in self.blocks:
            h = block(h)
        if query_genes.dim() == 2 and query_genes.numel() > gene_table.shape[0]:
            # per-cell gene sets larger in total than the table: project the table once, then gather
            return self.unpool(h, queries=gene_table, query_index=query_genes)  # (B, Q, d)
        return self.unpool(h, queries=F.embedding(query_genes, gene_table))  # (B, Q, d)


class LikelihoodHead(nn.Module):
    """Per-gene likelihood parameters from the unpooled outputs o (B, Q, d) and the genes' ids.

    A shared Linear gives the first output (NB / Poisson logit, or the Gaussian mean) and, for ZINB, the
    zero-inflation logit; `gene_head` adds w_g . o_g. Dispersions (log theta) and log sigma are per-gene tables.
    Each gene's parameters depend only on Z and its own id, so decoding a subset is that subset of a full decode.
    """

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.kind = c.likelihood
        self.shared = nn.Linear(c.d_model, 2 if c.likelihood == "zinb" else 1)
        self.gene_weight = nn.Embedding(c.n_genes + 1, c.d_model) if c.gene_head else None
        self.log_theta = nn.Embedding(c.n_genes + 1, 1) if c.likelihood in ("nb", "zinb") else None
        self.log_sigma = nn.Embedding(c.n_genes + 1, 1) if c.likelihood == "gaussian" else None

    def forward(self, o: Tensor, genes: Tensor) -> dict[str, Tensor]:
        out = self.shared(o)  # (B, Q, 1 or 2)
        first = out[..., 0]  # (B, Q)
        if self.gene_weight is not None:
            first = first + (o * self.gene_weight(genes)).sum(dim=-1)
        if self.kind == "gaussian":
            return {"m": first, "log_sigma": self.log_sigma(genes)[..., 0]}
        params = {"logits": first}
        if self.log_theta is not None:
            params["log_theta"] = self.log_theta(genes)[..., 0]  # (Q,) or (B, Q)
        if self.kind == "zinb":
            params["zi_logits"] = out[..., 1]
        return params

    def distribution(
        self, params: dict[str, Tensor], library_size: Tensor, log_weights: Tensor | None = None
    ) -> Likelihood:
        """The likelihood over (B, Q); count means = softmax over the Q genes (weighted by w_g if given) * L."""
        if self.kind == "gaussian":
            return Gaussian.from_log(params["m"], params["log_sigma"], library_size)
        logits = params["logits"]  # (B, Q)
        weighted = logits if log_weights is None else logits + log_weights
        log_mu = logits - torch.logsumexp(weighted, dim=-1, keepdim=True) + torch.log(library_size)[:, None]
        if self.kind == "poisson":
            return Poisson.from_log(log_mu)
        if self.kind == "zinb":
            return ZeroInflatedNegativeBinomial.from_log(log_mu, params["log_theta"], params["zi_logits"])
        return NegativeBinomial.from_log(log_mu, params["log_theta"])


class TransformerVAE(nn.Module):
    """Permutation-invariant encoder, permutation-equivariant decoder over sets of (gene, count) tokens."""

    def __init__(self, config: VAEConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embedding = TokenEmbedding(config)
        self.encoder = MCABEncoder(config)
        self.decoder = MCABDecoder(config)
        self.head = LikelihoodHead(config)
        self.init_parameters(seed)

    @torch.no_grad()
    def init_parameters(self, seed: int) -> None:
        """Seeded initialisation (PyTorch's constructors draw from the global RNG): Linear U(+-1/sqrt(fan_in)) with
        zero biases, gene embeddings and learned queries N(0, 1) (official code), readout table N(0, 1/k); the
        additions that must start as the paper's model (count directions, gene head, readout map) at zero."""
        g = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound, generator=g)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, MCAB) and module.queries is not None:
                nn.init.normal_(module.queries, generator=g)
        nn.init.normal_(self.embedding.genes.weight, generator=g)
        readout = self.encoder.readout
        if readout is not None:
            nn.init.normal_(readout.table.weight, std=1.0 / math.sqrt(self.config.count_readout), generator=g)
            nn.init.zeros_(readout.proj.weight)
        for table in (self.embedding.count_dir, self.head.gene_weight, self.head.log_sigma):
            if table is not None:
                nn.init.zeros_(table.weight)
        if self.head.log_theta is not None:
            nn.init.constant_(self.head.log_theta.weight, THETA_INIT)

    def _check_ids(self, name: str, ids: Tensor, allow_pad: bool) -> None:
        if ids.dtype != torch.long:
            raise ValueError(f"{name} must be int64 gene ids, got dtype {ids.dtype}")
        lo, G = (0 if allow_pad else 1), self.config.n_genes
        if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < lo or int(ids.max()) > G):
            raise ValueError(f"{name} has ids in [{int(ids.min())}, {int(ids.max())}], outside [{lo}, {G}]")

    def encode(
        self, genes: Tensor, counts: Tensor, mask: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Posterior of Z for token sets genes (B, S) int64 (0 = PAD), counts (B, S), mask (B, S) bool.

        Returns (mu, logvar), each (B, m, d_latent), or (z, None) for the deterministic encoder; invariant to the
        order of the tokens and to padding. `generator` draws the readout's training-time dropout.
        """
        if genes.dim() != 2 or counts.shape != genes.shape or mask.shape != genes.shape:
            raise ValueError(
                "genes, counts, mask must share a (B, S) shape, got "
                f"{tuple(genes.shape)}, {tuple(counts.shape)}, {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got dtype {mask.dtype}")
        self._check_ids("genes", genes, allow_pad=True)
        tokens = self.embedding(genes, counts)  # (B, S, d)
        return self.encoder(tokens, genes, counts, mask, generator)

    def decode_parameters(self, z: Tensor, query_genes: Tensor) -> dict[str, Tensor]:
        """Likelihood parameters of genes (Q,) shared by all cells or (B, Q) per cell, for z (B, m, d_latent).

        Returns (B, Q) tensors (per-gene tables as (Q,) or (B, Q)): "logits", "log_theta", "zi_logits" or
        "m", "log_sigma"; count logits are log-means up to a per-cell constant.
        """
        c = self.config
        if z.dim() != 3 or tuple(z.shape[1:]) != (c.n_latent_tokens, c.d_latent):
            raise ValueError(f"z must have shape (B, {c.n_latent_tokens}, {c.d_latent}), got {tuple(z.shape)}")
        if query_genes.dim() not in (1, 2) or (query_genes.dim() == 2 and query_genes.shape[0] != z.shape[0]):
            raise ValueError(f"query_genes must have shape (Q,) or ({z.shape[0]}, Q), got {tuple(query_genes.shape)}")
        self._check_ids("query_genes", query_genes, allow_pad=False)
        o = self.decoder(z, self.embedding.genes.weight, query_genes)  # (B, Q, d)
        return self.head(o, query_genes)

    def decode(
        self, z: Tensor, query_genes: Tensor, library_size: Tensor, log_weights: Tensor | None = None
    ) -> Likelihood:
        """p(x_I | Z, I) over (B, Q); count means sum to `library_size` (B,) over the decoded genes, or, with
        `log_weights` (B, Q) (a weighted sample standing for all G genes), estimate a full decode's means."""
        params = self.decode_parameters(z, query_genes)
        n = z.shape[0]
        if tuple(library_size.shape) != (n,):
            raise ValueError(f"library_size must have shape ({n},), got {tuple(library_size.shape)}")
        return self.head.distribution(params, library_size.to(z.dtype), log_weights)

    def loss(
        self,
        genes: Tensor,
        counts: Tensor,
        mask: Tensor,
        library_size: Tensor,
        target_genes: Tensor,
        target_counts: Tensor,
        target_weights: Tensor | None = None,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
    ) -> dict[str, Tensor]:
        """Negative ELBO of a batch: {"loss", "nll", "kl"}, scalars; loss = nll + beta * kl.

        Encoder input genes/counts/mask (B, S), library sizes (B,). Decoder target: every gene (target_genes of
        length G, no weights) or a weighted sample of them, target_genes (B, Q) with target_weights (B, Q): each
        drawn gene stands for w_g genes of its cell. nll = mean over cells of sum_g w_g * -log p(x_g | z), the
        softmax normaliser is the weighted one, so both estimate the all-gene quantities.
        """
        if target_counts.dim() != 2 or target_counts.shape[-1] != target_genes.shape[-1]:
            raise ValueError(
                f"target_counts must have shape (B, Q) matching target_genes {tuple(target_genes.shape)}, "
                f"got {tuple(target_counts.shape)}"
            )
        if target_weights is None and target_genes.shape[-1] != self.config.n_genes:
            raise ValueError("a gene subset needs target_weights (each drawn gene's share of the cell's genes)")
        if target_weights is not None and target_weights.shape != target_counts.shape:
            raise ValueError(
                f"target_weights must have the shape of target_counts {tuple(target_counts.shape)}, "
                f"got {tuple(target_weights.shape)}"
            )
        mu, logvar = self.encode(genes, counts, mask, generator)  # (B, m, d_latent)
        z = mu
        if logvar is not None and sample_posterior:
            if generator is None:
                raise ValueError("sampling the posterior needs an explicit torch.Generator (got generator=None)")
            eps = torch.randn(mu.shape, generator=generator, device=generator.device).to(mu)  # (B, m, d_latent)
            z = mu + torch.exp(0.5 * logvar) * eps
        w = None if target_weights is None else target_weights.to(mu.dtype)  # (B, Q)
        lik = self.decode(z, target_genes, library_size, None if w is None else torch.log(w))
        log_p = lik.log_prob(target_counts.to(mu.dtype))  # (B, Q)
        nll = -(log_p if w is None else w * log_p).sum(dim=-1).mean()
        kl = torch.zeros((), device=mu.device, dtype=mu.dtype)
        if logvar is not None:
            kl = 0.5 * (mu.square() + torch.exp(logvar) - 1.0 - logvar).sum(dim=(1, 2)).mean()
        return {"loss": nll + self.config.beta * kl, "nll": nll, "kl": kl}

    @torch.no_grad()
    def reconstruct(
        self, genes: Tensor, counts: Tensor, mask: Tensor, query_genes: Tensor, library_size: Tensor
    ) -> Likelihood:
        """Decode each cell's posterior mean over `query_genes` (Q,) or (B, Q) with library sizes (B,)."""
        mu, _ = self.encode(genes, counts, mask)
        return self.decode(mu, query_genes, library_size)
