"""Flow matching with a linear interpolant, classifier-free guidance and ODE samplers (paper §2.2.2 eq. 11, §2.2.4).

This module is the single place where the prior's formulas live:

* interpolant ``x_t = t z + (1 - t) eps`` (t = 0 noise, t = 1 data) and velocity target ``u_t = z - eps``;
* flow-matching loss ``E_{t, eps} || v(x_t, t, y~) - u_t ||^2`` with per-attribute label dropout ``y -> y~``;
* guidance: *joint* (eq. 11) ``v = v_null + w (v_y - v_null)`` and *additive* (CFGen)
  ``v = v_null + sum_j w_j (v_{y_j} - v_null)``;
* analogy, for a combination y never seen in training: ``v_y = v_base + v_plus - v_minus`` (averaged over up to
  a few such parallelograms) with base, plus and minus seen combinations, base equal to y but for one key, plus and
  minus another context with y's and base's value of that key;
* samplers integrating ``dx/dt = v(x, t)`` from t = 0 to t = 1 (generation) or back from 1 to 0 (inversion, for
  counterfactual transfer): ``euler``, ``heun``, adaptive ``dopri5``; one implementation for both directions.

A velocity function has the signature ``velocity_fn(x (B, ...), t (B,)) -> (B, ...)``.
Shapes: ``B`` samples, ``m`` latent tokens, ``dl`` latent width, ``K`` condition keys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from sclatent.nn.dit import DiT, drop_labels, null_labels

logger = logging.getLogger(__name__)

VelocityFn = Callable[[Tensor, Tensor], Tensor]
GUIDANCE_MODES = ("joint", "additive")
SAMPLERS = ("euler", "heun", "dopri5")


# --------------------------------------------------------------------------------------------------------------
# Linear interpolant and flow-matching loss
# --------------------------------------------------------------------------------------------------------------
def interpolate(z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Linear interpolant ``x_t = t z + (1 - t) eps``: z, eps (B, ...), t (B,) -> (B, ...)."""
    t = t.view(-1, *([1] * (z.ndim - 1)))  # (B, 1, ..., 1)
    return t * z + (1 - t) * eps


def target_velocity(z: Tensor, eps: Tensor) -> Tensor:
    """Velocity of the linear interpolant, ``d x_t / dt = z - eps`` (independent of t)."""
    return z - eps


def _uniform(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """U[0, 1) draws from generator (on the generator's device), returned on like's device and dtype."""
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def _normal(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """N(0, 1) draws from generator (on the generator's device), returned on like's device and dtype."""
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def flow_matching_loss(
    model: DiT, z: Tensor, labels: Tensor, generator: torch.Generator, rho: float, scheme: str = "independent"
) -> Tensor:
    """Flow-matching MSE for a batch of data latents.

    z (B, m, dl) are data latents, labels (B, K) their label codes. Draws, in this order from generator:
    t ~ U[0, 1] (B,), eps ~ N(0, I) like z, and the label dropout (each label -> null with probability rho,
    independently per attribute). Returns the mean over all B*m*dl entries of ``(v(x_t, t, y~) - (z - eps))^2``.
    """
    if z.ndim != 3:
        raise ValueError(f"z must have shape (B, m, d_latent), got {tuple(z.shape)}")
    b = z.shape[0]
    t = _uniform((b,), generator, z)  # (B,)
    eps = _normal(tuple(z.shape), generator, z)  # (B, m, dl)
    dropped = drop_labels(labels, model.config, rho, generator, scheme)  # (B, K)
    x_t = interpolate(z, eps, t)  # (B, m, dl)
    v = model(x_t, t, dropped)  # (B, m, dl)
    return torch.mean((v - target_velocity(z, eps)) ** 2)


# --------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------------------
Combination = tuple[int, ...]  # the label codes of every condition key (no null code)
Analogy = tuple[Combination, Combination, Combination]  # (base, plus, minus)
MAX_ANALOGIES = 4  # parallelograms averaged per unseen combination (each costs three model evaluations)


def analogies(
    target: Combination, seen: Mapping[Combination, int], base: Combination | None = None, limit: int = MAX_ANALOGIES
) -> list[Analogy]:
    """Parallelograms that compose the unseen combination `target` from seen ones: (base, plus, minus) with
    base = target except in one key j (value u), plus = a seen context holding target's value of j, minus = the
    same context with u. Then target = base + (plus - minus): the effect of switching key j from u to target's
    value, measured where both were seen, applied to base. `seen` maps each seen combination to its training cells;
    the `limit` parallelograms whose least-populated member has the most cells are kept (ties in code order).
    With `base` (a transferred cell's own combination) only the parallelograms built on it are used, when any is.
    Empty for a seen target or when no parallelogram exists."""
    if target in seen:
        return []
    found: dict[frozenset, tuple[int, Analogy]] = {}
    # the last keys first: each parallelogram is kept in the orientation whose base differs from the target in the
    # latest key (with keys cell type, condition: the base is the same cell type under another condition)
    for j in reversed(range(len(target))):
        for other in seen:
            if other[j] == target[j] or any(other[i] != target[i] for i in range(len(target)) if i != j):
                continue  # base: differs from the target in key j only
            u = other[j]
            for plus in seen:
                if plus[j] != target[j] or plus == target:
                    continue
                minus = plus[:j] + (u,) + plus[j + 1 :]
                if minus not in seen or minus == other:
                    continue
                key = frozenset([(other, plus), (plus, other)]) | {minus}
                weight = min(seen[other], seen[plus], seen[minus])
                if key not in found:
                    found[key] = (weight, (other, plus, minus))
    grams = sorted(found.values(), key=lambda item: (-item[0], item[1]))
    if base is not None:
        own = [g for g in grams if base in g[1][:2]]
        grams = own or grams
        grams = [(w, (base, g[1] if g[0] == base else g[0], g[2])) for w, g in grams] if own else grams
    return [g for _, g in grams[:limit]]


class GuidedVelocity:
    """Guided velocity field ``(x (B, m, dl), t (B,)) -> (B, m, dl)`` for a fixed request ``labels`` (B, K).

    A request holds, per sample, the label code of every requested attribute and the null code of every other one.

    * ``"joint"`` (paper eq. 11), scalar w: ``v = v_null + w (v_y - v_null)``, y = the requested subset.
    * ``"additive"`` (CFGen), one weight per key: ``v = v_null + sum_j w_j (v_{y_j} - v_null)`` over the requested
      attributes j of each sample, where y_j keeps only attribute j.

    ``analogies`` (joint guidance only): per sample, the parallelograms of :func:`analogies` that stand in for its
    combination when it was never seen, ``v_y = mean over them of (v_base + v_plus - v_minus)``; an empty list keeps
    the sample's own request. Those terms are evaluated only for the samples that need them. ``row_w`` (joint
    guidance only): one weight per sample in place of w (a never-seen combination is guided more strongly).

    All evaluations of one call are concatenated along the batch into a single model forward. Evaluations that
    cannot change the result are skipped, which makes the identities exact: w = 0 is the unconditional model,
    joint w = 1 is the conditional model ``v(x, t, labels)``, and additive with all w_j = 1 is the conditional model
    when every sample requests exactly one attribute (CFGen's setting). Samples that request nothing get v_null.
    ``model_calls`` / ``model_rows`` count forwards and the rows passed through the network. With ``autocast``
    the network runs under bf16 autocast (its matrix products in bf16) and its output is cast back to x's dtype.
    """

    def __init__(
        self,
        model: DiT,
        labels: Tensor,
        guidance: str,
        w: float | Sequence[float],
        autocast: bool = False,
        analogies: Sequence[Sequence[Analogy]] | None = None,
        row_w: Sequence[float] | None = None,
    ) -> None:
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance {guidance!r}; choose one of {GUIDANCE_MODES}")
        if labels.ndim != 2:
            raise ValueError(f"labels must have shape (B, K), got {tuple(labels.shape)}")
        model.check_labels(labels, labels.shape[0])
        self.model = model
        self.autocast = autocast
        self.guidance = guidance
        self.batch_size = labels.shape[0]
        self.model_calls = 0
        self.model_rows = 0
        k = labels.shape[1]
        null = null_labels(labels, model.config)  # (B, K)
        requested = labels != null  # (B, K)

        if guidance == "joint":
            if isinstance(w, Sequence) or not math.isfinite(float(w)):
                raise ValueError(f"joint guidance takes one finite scalar weight w, got {w!r}")
            self.weights = [float(w)]
            wj = float(w)
            self.row_requested = requested.any(dim=1)  # (B,)
            b = labels.shape[0]
            if analogies is not None and len(analogies) != b:
                raise ValueError(f"analogies must hold one list per sample ({b}), got {len(analogies)}")
            if row_w is not None and (len(row_w) != b or not all(math.isfinite(float(x)) for x in row_w)):
                raise ValueError(f"row_w must hold one finite weight per sample ({b}), got {len(row_w)}")
            per_row = [wj] * b if row_w is None else [float(x) for x in row_w]
            if any(x != wj for x in per_row) or (wj != 0.0 and analogies is not None and any(analogies)):
                self._combination_plan(labels, null, per_row, analogies or [[] for _ in range(b)])
            elif wj == 0.0 or not bool(self.row_requested.any()):
                self._plan = "single"
                self.requests = null
            elif wj == 1.0:
                self._plan = "single"
                self.requests = labels
            else:
                self._plan = "joint"
                self.requests = torch.cat([null, labels])  # (2B, K)
        else:
            weights = [float(w)] * k if not isinstance(w, Sequence) else [float(x) for x in w]
            if len(weights) != k or not all(math.isfinite(x) for x in weights):
                raise ValueError(f"additive guidance needs {k} finite weights (one per condition key), got {w!r}")
            self.weights = weights
            # attributes that contribute a term: non-zero weight and requested by at least one sample
            self.active = [j for j in range(k) if weights[j] != 0.0 and bool(requested[:, j].any())]
            active_mask = torch.zeros(k, dtype=torch.bool, device=labels.device)
            active_mask[self.active] = True
            n_active_per_row = (requested & active_mask).sum(dim=1)  # (B,)
            if not self.active:
                self._plan = "single"
                self.requests = null
            elif all(weights[j] == 1.0 for j in self.active) and bool((n_active_per_row == 1).all()):
                # every sample has a single term with weight 1: v = v_{y_j}, the null evaluation is redundant
                self._plan = "single"
                self.requests = torch.where(active_mask, labels, null)
            else:
                self._plan = "additive"
                self.term_masks = [requested[:, j] for j in self.active]  # each (B,)
                single = [torch.where(torch.arange(k, device=labels.device) == j, labels, null) for j in self.active]
                self.requests = torch.cat([null, *single])  # ((1 + J) B, K)
        self.n_terms = -(-self.requests.shape[0] // self.batch_size)
        logger.debug("guidance %s w=%s: %d evaluations per call", guidance, self.weights, self.n_terms)

    def _combination_plan(
        self, labels: Tensor, null: Tensor, ws: Sequence[float], grams: Sequence[Sequence[Analogy]]
    ) -> None:
        """Per sample i, the weighted label rows of ``v_null + w_i (v_y - v_null)`` with v_y its analogy terms or its
        own request: (sample index, labels, coefficient) entries, evaluated together and summed per sample."""
        rows, requests, coefs = [], [], []
        for i in range(labels.shape[0]):
            own = tuple(int(c) for c in labels[i])
            nul = tuple(int(c) for c in null[i])
            terms: dict[tuple[int, ...], float] = {}
            w = ws[i]
            if not bool(self.row_requested[i]) or w == 0.0:
                terms[nul] = 1.0
            else:
                for base, plus, minus in grams[i]:
                    for combo, sign in ((base, 1.0), (plus, 1.0), (minus, -1.0)):
                        terms[combo] = terms.get(combo, 0.0) + w * sign / len(grams[i])
                if not grams[i]:
                    terms[own] = w
                terms[nul] = terms.get(nul, 0.0) + (1.0 - w)
            for combo, c in terms.items():
                if c != 0.0:
                    rows.append(i)
                    requests.append(combo)
                    coefs.append(c)
        self._plan = "combination"
        self.rows = torch.tensor(rows, dtype=torch.long, device=labels.device)  # (E,)
        self.requests = torch.tensor(requests, dtype=labels.dtype, device=labels.device)  # (E, K)
        self.coefs = torch.tensor(coefs, dtype=torch.float32, device=labels.device)  # (E,)
        self.model.check_labels(self.requests, len(rows))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Guided velocity at (x (B, m, dl), t (B,)) -> (B, m, dl); one batched model forward."""
        b = self.batch_size
        if x.shape[0] != b:
            raise ValueError(f"x has batch size {x.shape[0]} but the guidance request has {b}")
        if self._plan == "combination":
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(x[self.rows], t[self.rows], self.requests)  # (E, m, dl)
            self.model_calls += 1
            self.model_rows += len(self.rows)
            weighted = self.coefs.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * out.to(x.dtype)
            return torch.zeros_like(x).index_add_(0, self.rows, weighted)
        xs = torch.cat([x] * self.n_terms) if self.n_terms > 1 else x  # (T B, m, dl)
        ts = torch.cat([t] * self.n_terms) if self.n_terms > 1 else t  # (T B,)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(xs, ts, self.requests)  # (T B, m, dl)
        out = out.to(x.dtype)  # the guidance combination and the ODE state stay in x's precision
        self.model_calls += 1
        self.model_rows += xs.shape[0]
        if self._plan == "single":
            return out
        rows = (b,) + (1,) * (x.ndim - 1)
        v_null = out[:b]
        if self._plan == "joint":
            v_y = out[b:]
            v = v_null + self.weights[0] * (v_y - v_null)
            return torch.where(self.row_requested.view(rows), v, v_null)
        v = v_null
        for i, (j, mask) in enumerate(zip(self.active, self.term_masks)):
            v_j = out[(i + 1) * b : (i + 2) * b]
            v = v + torch.where(mask.view(rows), self.weights[j] * (v_j - v_null), 0.0)
        return v


def guided_velocity(
    model: DiT,
    labels: Tensor,
    guidance: Literal["joint", "additive"] = "joint",
    w: float | Sequence[float] = 1.0,
    autocast: bool = False,
    analogies: Sequence[Sequence[Analogy]] | None = None,
    row_w: Sequence[float] | None = None,
) -> GuidedVelocity:
    """Velocity function of the guided field for request labels (B, K); see :class:`GuidedVelocity`."""
    return GuidedVelocity(model, labels, guidance, w, autocast=autocast, analogies=analogies, row_w=row_w)


# --------------------------------------------------------------------------------------------------------------
# ODE samplers, t = 0 (noise) -> t = 1 (data), or back
# --------------------------------------------------------------------------------------------------------------
class _CountingRHS:
    """Wraps a velocity function: takes a python-float time, counts evaluations (NFE)."""

    def __init__(self, velocity_fn: VelocityFn, x0: Tensor) -> None:
        self.velocity_fn = velocity_fn
        self.batch_size = x0.shape[0]
        self.like = x0
        self.nfe = 0

    def __call__(self, t: float, x: Tensor) -> Tensor:
        self.nfe += 1
        tt = torch.full((self.batch_size,), t, dtype=self.like.dtype, device=self.like.device)  # (B,)
        v = self.velocity_fn(x, tt)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for state of shape {tuple(x.shape)}")
        return v


def _euler(f: _CountingRHS, x: Tensor, n_steps: int, t0: float, t1: float) -> Tensor:
    """Explicit Euler on the uniform grid t_i = t0 + i (t1 - t0) / n_steps: n_steps evaluations."""
    h = (t1 - t0) / n_steps
    for i in range(n_steps):
        x = x + h * f(t0 + (t1 - t0) * i / n_steps, x)
    return x


def _heun(f: _CountingRHS, x: Tensor, n_steps: int, t0: float, t1: float) -> Tensor:
    """Heun's method (explicit trapezoid) on t_i = t0 + i (t1 - t0) / n_steps, corrector on every step:
    2 n_steps evaluations.

    The last step keeps its corrector: the velocity field is regular at t = 1 (unlike EDM's sigma = 0 endpoint).
    """
    h = (t1 - t0) / n_steps
    for i in range(n_steps):
        ta, tb = t0 + (t1 - t0) * i / n_steps, t0 + (t1 - t0) * (i + 1) / n_steps
        k1 = f(ta, x)
        x_pred = x + h * k1
        k2 = f(tb, x_pred)
        x = x + 0.5 * h * (k1 + k2)
    return x


# Dormand–Prince 5(4) Butcher tableau (Dormand & Prince 1980; Hairer, Nørsett & Wanner, Solving ODEs I, II.5).
# Hand-written instead of depending on torchdiffeq, so the sampler has no extra dependency and counts its NFE.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)  # 5th order (the propagated solution)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)  # embedded 4th order
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _rms(x: Tensor) -> float:
    """Root mean square over all entries (the error norm of Hairer et al. and torchdiffeq)."""
    return float(torch.sqrt(torch.mean(x.double() ** 2)))


def _initial_step(f: _CountingRHS, x0: Tensor, f0: Tensor, atol: float, rtol: float, t0: float, sign: float) -> float:
    """Starting step size (a magnitude) of Hairer, Nørsett & Wanner (II.4, p. 169), order 5, capped at the interval
    length 1; the trial step goes in the direction `sign` from t0. Costs one evaluation."""
    scale = atol + rtol * x0.abs()
    d0, d1 = _rms(x0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, 1.0)
    f1 = f(t0 + sign * h0, x0 + sign * h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, 1.0)


def _dopri5(f: _CountingRHS, x: Tensor, atol: float, rtol: float, max_steps: int, t0: float, t1: float) -> Tensor:
    """Adaptive Dormand–Prince 5(4) with FSAL and local error control from t0 to t1 (either direction).

    A step is accepted when RMS(err / (atol + rtol max(|x|, |x_new|))) <= 1 (the norm runs over the whole batch,
    so all samples share one step-size sequence). Step factor ``0.9 err^(-1/5)`` clipped to [0.2, 10] (no growth
    right after a rejection). Cost: 2 evaluations to start + 6 per attempted step.
    """
    sign = 1.0 if t1 > t0 else -1.0
    t = t0
    k1 = f(t, x)
    h = _initial_step(f, x, k1, atol, rtol, t0, sign)  # step magnitude; the signed step is sign * h
    accepted = rejected = 0
    just_rejected = False
    while sign * (t1 - t) > 0:
        if accepted + rejected >= max_steps:
            raise RuntimeError(f"dopri5 did not reach t={t1:g} within max_steps={max_steps} (t={t:.6f}, h={h:.3e})")
        if h < 1e-12:
            raise RuntimeError(f"dopri5 step size underflow at t={t:.6f} (h={h:.3e}); is the velocity finite?")
        last = h >= sign * (t1 - t)
        if last:
            h = sign * (t1 - t)
        t_new = t1 if last else t + sign * h
        hs = sign * h  # signed step
        ks = [k1]
        for i in range(1, 7):
            dx = sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(f(t + _DP_C[i] * hs if i < 6 else t_new, x + hs * dx))
        # row 7 of A equals b5, so the stage-7 state is the 5th-order solution and ks[6] = f(t_new, x_new) (FSAL)
        x_new = x + hs * sum(b * k for b, k in zip(_DP_B5, ks) if b != 0.0)
        err_vec = hs * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err = _rms(err_vec / scale)
        if not math.isfinite(err):
            raise RuntimeError(f"dopri5 met a non-finite velocity at t={t:.6f}")
        if err <= 1.0:
            t, x, k1 = t_new, x_new, ks[6]
            accepted += 1
            factor = _MAX_FACTOR if err == 0.0 else min(_MAX_FACTOR, max(_MIN_FACTOR, _SAFETY * err**-0.2))
            if just_rejected:
                factor = min(factor, 1.0)
            just_rejected = False
        else:
            rejected += 1
            factor = max(_MIN_FACTOR, _SAFETY * err**-0.2)
            just_rejected = True
        h = h * factor
    logger.debug("dopri5: %d accepted, %d rejected steps, nfe=%d", accepted, rejected, f.nfe)
    return x


@torch.no_grad()
def integrate(
    velocity_fn: VelocityFn,
    x: Tensor,
    t0: float,
    t1: float,
    method: Literal["euler", "heun", "dopri5"] = "dopri5",
    n_steps: int | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    max_steps: int = 100_000,
) -> tuple[Tensor, int]:
    """Integrate dx/dt = velocity_fn(x, t) from time t0 (state x) to t1, forwards (t1 > t0) or backwards.

    ``euler`` / ``heun`` take ``n_steps`` uniform steps (NFE = n_steps / 2 n_steps); ``dopri5`` is adaptive with
    tolerances ``atol`` / ``rtol`` (NFE = 2 + 6 x attempted steps) and refuses ``n_steps``. Returns (x(t1), nfe),
    where nfe counts calls of velocity_fn (a guided call batching several model evaluations counts once).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {SAMPLERS}")
    if not (0.0 <= t0 <= 1.0 and 0.0 <= t1 <= 1.0) or t0 == t1:
        raise ValueError(f"integration needs two different times in [0, 1], got t0={t0!r}, t1={t1!r}")
    f = _CountingRHS(velocity_fn, x)
    if method in ("euler", "heun"):
        if n_steps is None or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"sampler {method!r} needs n_steps >= 1, got {n_steps!r}")
        out = _euler(f, x, n_steps, t0, t1) if method == "euler" else _heun(f, x, n_steps, t0, t1)
    else:
        if n_steps is not None:
            raise ValueError(f"dopri5 is adaptive and does not use n_steps (got {n_steps!r}); set atol/rtol instead")
        if not (atol > 0 and rtol > 0):
            raise ValueError(f"dopri5 needs atol > 0 and rtol > 0, got atol={atol!r}, rtol={rtol!r}")
        out = _dopri5(f, x, atol, rtol, max_steps, t0, t1)
    return out, f.nfe


def sample(
    velocity_fn: VelocityFn, x0: Tensor, method: str = "dopri5", n_steps: int | None = None, **kw
) -> tuple[Tensor, int]:
    """Generate: integrate from t = 0 (x0, noise drawn by the caller) to t = 1 (data); see :func:`integrate`."""
    return integrate(velocity_fn, x0, 0.0, 1.0, method, n_steps, **kw)  # type: ignore[arg-type]


def invert(
    velocity_fn: VelocityFn, x1: Tensor, method: str = "dopri5", n_steps: int | None = None, **kw
) -> tuple[Tensor, int]:
    """Invert: integrate backwards from data x1 at t = 1 to the noise at t = 0 that the same field carries to x1
    (the probability-flow ODE is deterministic, so :func:`sample` of the result returns x1 up to the ODE error)."""
    return integrate(velocity_fn, x1, 1.0, 0.0, method, n_steps, **kw)  # type: ignore[arg-type]
