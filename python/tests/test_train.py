"""Tests for sclatent.train: schedule, EMA, clipping, checkpoint/resume, history, NaN handling (toy models, CPU)."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sclatent.checkpoint import atomic_torch_save, load_checkpoint
from sclatent.io import write_json
from sclatent.train import EMA, NonFiniteLossError, TrainConfig, lr_factor, param_groups, train

# --------------------------------------------------------------------------------------------------------
# toy data and models


class ToyData:
    """Linear-regression data y = x w* + noise, shuffled per epoch from (seed, epoch), drop-last batches."""

    def __init__(self, n: int = 60, d: int = 4, batch_size: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, d, generator=g)  # (N, d)
        w = torch.randn(d, 1, generator=g)
        self.y = self.x @ w + 0.01 * torch.randn(n, 1, generator=g)  # (N, 1)
        self.batch_size = batch_size
        self.seed = seed

    def n_batches(self, epoch: int) -> int:
        return self.x.shape[0] // self.batch_size

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.x.shape[0], generator=g)
        for b in range(start_batch, self.n_batches(epoch)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


class ToyNet(nn.Module):
    """A small MLP with dropout, so that resume must also restore the global RNG."""

    def __init__(self, d: int = 4, hidden: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_loss(model: nn.Module, batch, generator: torch.Generator):
    """MSE on inputs jittered with generator noise (so that resume must restore the generator)."""
    x, y = batch
    noise = 0.05 * torch.randn(x.shape, generator=generator, device=generator.device)
    mse = ((model(x + noise) - y) ** 2).mean()
    return mse, {"mse": mse.item(), "noise_abs": noise.abs().mean().item()}


def make_model(seed: int = 0, **kw) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(**kw)


def read_history(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


MODEL_CONFIG = {"d": 4, "hidden": 16, "dropout": 0.1, "blocks": {"n": 1}}


def cfg_for(**kw) -> TrainConfig:
    base = dict(max_steps=20, batch_size=10, lr=1e-2, checkpoint_every=10, log_every=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------------------
# schedule and config


@pytest.mark.parametrize("shape", ["sqrt", "cosine", "linear"])
def test_lr_factor_key_steps(shape: str) -> None:
    cfg = TrainConfig(
        max_steps=100, batch_size=1, warmup_frac=0.1, decay_frac=0.2, decay_shape=shape, final_lr_factor=0.1
    )
    assert lr_factor(0, cfg) == pytest.approx(0.01)  # warmup starts at lr/100
    assert lr_factor(5, cfg) == pytest.approx(0.5 + 0.5 / 100)  # halfway up the linear ramp
    assert lr_factor(10, cfg) == 1.0  # end of warmup
    assert lr_factor(50, cfg) == 1.0  # stable
    assert lr_factor(79, cfg) == 1.0  # last stable step
    assert lr_factor(80, cfg) == pytest.approx(1.0)  # decay starts at 1
    half = {"sqrt": 1 - math.sqrt(0.5), "cosine": 0.5, "linear": 0.5}[shape]
    assert lr_factor(90, cfg) == pytest.approx(0.1 + 0.9 * half)  # halfway through the decay
    assert lr_factor(99, cfg) < lr_factor(90, cfg)
    assert lr_factor(100, cfg) == pytest.approx(0.1)  # decay end
    assert lr_factor(10_000, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(101)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))  # non-decreasing warmup
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # non-increasing afterwards


def test_lr_factor_authors_prior_schedule() -> None:
    """decay_frac=1 + cosine: decay starts right after warmup, reaching r at max_steps."""
    cfg = TrainConfig(max_steps=1000, batch_size=1, decay_frac=1.0, decay_shape="cosine", final_lr_factor=0.1)
    assert lr_factor(100, cfg) == pytest.approx(1.0)
    assert lr_factor(550, cfg) == pytest.approx(0.55)  # cos(pi/2) midpoint of the decay
    assert lr_factor(1000, cfg) == pytest.approx(0.1)


def test_lr_factor_no_warmup_and_bad_step() -> None:
    cfg = TrainConfig(max_steps=10, batch_size=1, warmup_frac=0.0, decay_frac=0.0)
    assert [lr_factor(s, cfg) for s in range(10)] == [1.0] * 10
    with pytest.raises(ValueError, match="-1"):
        lr_factor(-1, cfg)


def test_config_roundtrip_and_validation() -> None:
    cfg = TrainConfig(max_steps=5, batch_size=2, betas=(0.8, 0.9), ema_decay=0.99)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="'exp'"):
        TrainConfig(max_steps=5, batch_size=2, decay_shape="exp")
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0, batch_size=2)
    with pytest.raises(ValueError, match="1.5"):
        TrainConfig(max_steps=5, batch_size=2, ema_decay=1.5)


def test_lr_scales_multiply_the_learning_rate_of_the_named_parameters(tmp_path: Path) -> None:
    """A parameter named by lr_scales (or under a named module) steps with lr x scale at every step of the schedule,
    the others with lr; with no scales the optimiser is one group, as before; bad names and values are refused."""
    model = make_model()
    groups = param_groups(model, {"net.0": 4.0, "net.0.bias": 0.5})
    assert [(g["lr_scale"], len(g["params"])) for g in groups] == [(1.0, 2), (4.0, 1), (0.5, 1)]
    assert groups[1]["params"][0] is model.net[0].weight and groups[2]["params"][0] is model.net[0].bias
    assert [(g["lr_scale"], len(g["params"])) for g in param_groups(model, {})] == [(1.0, 4)]
    with pytest.raises(ValueError, match="names no trainable parameter of the model: log_theta"):
        param_groups(model, {"log_theta": 10.0})
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="lr_scales"):
            TrainConfig(max_steps=5, batch_size=2, lr_scales={"net.0": bad})
    cfg = TrainConfig(max_steps=5, batch_size=2, lr_scales={"net.0": 3})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

    seen: list[list[tuple[float, float]]] = []

    def pre_step_hook(optimizer, args, kwargs):
        seen.append([(g["lr"], g["lr_scale"]) for g in optimizer.param_groups])

    handle = register_optimizer_step_pre_hook(pre_step_hook)
    try:
        train(
            make_model(),
            toy_loss,
            ToyData(),
            cfg_for(max_steps=6, lr_scales={"net.3": 10.0}),
            tmp_path,
            model_config=MODEL_CONFIG,
            progress=False,
        )
    finally:
        handle.remove()
    assert len(seen) == 6
    for step, groups_lr in enumerate(seen):
        (lr, one), (lr_scaled, ten) = groups_lr
        assert (one, ten) == (1.0, 10.0)
        assert lr == pytest.approx(1e-2 * lr_factor(step, cfg_for(max_steps=6)))
        assert lr_scaled == pytest.approx(10 * lr)


def test_bf16_autocast_trains_on_cpu_and_fp32_is_the_default_everywhere(tmp_path: Path) -> None:
    """precision is the user's choice only: fp32 unless bf16 is asked for, on any device; other values refused."""
    assert TrainConfig(max_steps=1, batch_size=1).precision == "fp32"
    with pytest.raises(ValueError, match="'auto'"):
        TrainConfig(max_steps=1, batch_size=1, precision="auto")
    result = train(
        make_model(),
        toy_loss,
        ToyData(),
        cfg_for(precision="bf16"),
        tmp_path,
        model_config=MODEL_CONFIG,
        progress=False,
    )
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert result.step == cfg_for().max_steps and all(math.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((tmp_path / "config.json").read_text())["precision_used"] == "bf16"


# --------------------------------------------------------------------------------------------------------
# training behaviour


def test_toy_regression_loss_falls(tmp_path: Path) -> None:
    cfg = cfg_for(max_steps=150, log_every=10, checkpoint_every=1000)
    result = train(
        make_model(dropout=0.0), toy_loss, ToyData(), cfg, tmp_path, model_config=MODEL_CONFIG, progress=False
    )
    _, rows = read_history(result.history_path)
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(10, 151, 10))
    assert losses[-1] < 0.1 * losses[0]
    assert result.step == 150
    assert load_checkpoint(result.checkpoint_path)["step"] == 150  # always a checkpoint at the end


def test_ema_update_formula() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5, warmup=False)
    for n, value in enumerate((1.0, 3.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, n)
    # 0 -> 0.5*0 + 0.5*1 = 0.5 -> 0.5*0.5 + 0.5*3 = 1.75
    assert ema.state_dict()["weight"].item() == 1.75
    assert model.weight.item() == 3.0  # the model itself is untouched


def test_ema_warmup_decay_and_forgetting_the_initial_weights() -> None:
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.999)
    assert [ema.decay_at(n) for n in (0, 1, 8990, 8991, 10**6)] == [0.1, 2 / 11, 8991 / 9000, 0.999, 0.999]
    assert EMA(model, decay=0.999, warmup=False).decay_at(0) == 0.999
    # weight 0 at initialisation, then 1 for 1,500 steps: the warmed-up EMA is (almost) 1, the plain one keeps
    # 0.999^1500 = 22% of the initial 0.
    with torch.no_grad():
        model.weight.fill_(0.0)
    warm, plain = EMA(model, decay=0.999), EMA(model, decay=0.999, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for n in range(1500):
        warm.update(model, n)
        plain.update(model, n)
    assert warm.state_dict()["weight"].item() > 1.0 - 1e-6
    assert abs(plain.state_dict()["weight"].item() - (1.0 - 0.999**1500)) < 1e-4


def test_configs_without_ema_warmup_load_as_before_it() -> None:
    d = TrainConfig(max_steps=5, batch_size=2, ema_decay=0.999).to_dict()
    assert d["ema_warmup"] is True and TrainConfig.from_dict(d).ema_warmup is True
    del d["ema_warmup"]
    assert TrainConfig.from_dict(d).ema_warmup is False


def test_ema_in_training_follows_the_formula(tmp_path: Path) -> None:
    """Recompute the EMA from the weights seen by loss_fn (the weights after each previous step)."""
    seen: list[torch.Tensor] = []

    def recording_loss(model, batch, generator):
        seen.append(model.net[0].weight.detach().clone())
        return toy_loss(model, batch, generator)

    cfg = cfg_for(max_steps=12, ema_decay=0.9)
    model = make_model()
    result = train(model, recording_loss, ToyData(), cfg, tmp_path, model_config=MODEL_CONFIG, progress=False)
    trajectory = seen + [model.net[0].weight.detach().clone()]  # weights before step 1 .. after step 12
    expected = trajectory[0].clone()
    for n, w in enumerate(trajectory[1:]):
        d = min(0.9, (1 + n) / (10 + n))  # the warm-up (on by default)
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(result.model_state("ema")["net.0.weight"], expected)
    assert not torch.equal(result.model_state("ema")["net.0.weight"], result.model_state("model")["net.0.weight"])


def test_grad_clip_bounds_applied_norm(tmp_path: Path) -> None:
    applied: list[float] = []
    model = make_model()

    def pre_step_hook(optimizer, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        applied.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def big_loss(model, batch, generator):
        loss, terms = toy_loss(model, batch, generator)
        return 1e4 * loss, terms  # gradients far above the clip threshold

    handle = register_optimizer_step_pre_hook(pre_step_hook)
    try:
        result = train(
            model,
            big_loss,
            ToyData(),
            cfg_for(max_steps=5, grad_clip=0.5),
            tmp_path,
            model_config=MODEL_CONFIG,
            progress=False,
        )
    finally:
        handle.remove()
    assert len(applied) == 5
    assert max(applied) <= 0.5 * (1 + 1e-5)
    _, rows = read_history(result.history_path)
    assert min(float(r["grad_norm"]) for r in rows) > 0.5  # the logged (pre-clip) norm was above the bound


# --------------------------------------------------------------------------------------------------------
# files, checkpoint, resume


def test_checkpoint_loads_weights_only_and_history_columns(tmp_path: Path) -> None:
    result = train(
        make_model(),
        toy_loss,
        ToyData(),
        cfg_for(max_steps=10, ema_decay=0.99, log_every=3),
        tmp_path,
        model_config=MODEL_CONFIG,
        metadata={"inputs": {"x": "abc123"}},
        progress=False,
    )
    ckpt = torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)
    for key in (
        "model",
        "ema",
        "optimizer",
        "step",
        "epoch",
        "batch_in_epoch",
        "generator",
        "torch_rng",
        "history_len",
    ):
        assert key in ckpt
    assert ckpt["step"] == 10 and (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 4)  # 6 batches per epoch
    assert isinstance(ckpt["generator"], torch.Tensor)
    assert set(ckpt["ema"]) == set(ckpt["model"])
    fresh = make_model(seed=99)
    fresh.load_state_dict(ckpt["model"])  # a plain state dict
    assert load_checkpoint(result.checkpoint_path)["step"] == 10  # the helper loads the same file
    header, rows = read_history(result.history_path)
    assert header == ["step", "epoch", "loss", "mse", "noise_abs", "lr", "grad_norm", "cells_per_s", "elapsed_s"]
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 10]
    assert ckpt["history_len"] == 4
    assert all(float(r["cells_per_s"]) > 0 for r in rows)
    config = json.loads(result.config_path.read_text())
    assert config["model_config"] == MODEL_CONFIG
    assert TrainConfig.from_dict(config["train_config"]) == cfg_for(max_steps=10, ema_decay=0.99, log_every=3)
    assert config["metadata"] == {"inputs": {"x": "abc123"}}
    import sclatent

    assert config["sclatent_version"] == sclatent.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "history.csv"]


class Interrupted(Exception):
    """Simulates a killed job."""


@pytest.mark.parametrize("log_every", [1, 3])
def test_resume_equals_uninterrupted(tmp_path: Path, log_every: int) -> None:
    cfg = cfg_for(max_steps=20, checkpoint_every=10, log_every=log_every, ema_decay=0.9, weight_decay=0.01)
    straight = train(
        make_model(), toy_loss, ToyData(), cfg, tmp_path / "straight", model_config=MODEL_CONFIG, progress=False
    )

    calls = {"n": 0}

    def dying_loss(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 14:  # after the step-10 checkpoint and a few logged rows
            raise Interrupted
        return toy_loss(model, batch, generator)

    run_dir = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(make_model(), dying_loss, ToyData(), cfg, run_dir, model_config=MODEL_CONFIG, progress=False)
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 10
    _, rows_before = read_history(run_dir / "history.csv")
    assert int(rows_before[-1]["step"]) > 10  # rows past the checkpoint exist and must be dropped on resume

    torch.manual_seed(12345)  # the resume must not depend on the caller's global RNG state
    resumed = train(
        make_model(seed=7), toy_loss, ToyData(), cfg, run_dir, resume=True, model_config=MODEL_CONFIG, progress=False
    )

    _, rows_a = read_history(straight.history_path)
    _, rows_b = read_history(resumed.history_path)
    steps_b = [int(r["step"]) for r in rows_b]
    assert len(steps_b) == len(set(steps_b))  # no duplicated steps
    assert steps_b == [int(r["step"]) for r in rows_a]
    for col in ("loss", "mse", "noise_abs", "lr", "grad_norm", "epoch"):
        assert [r[col] for r in rows_b] == [r[col] for r in rows_a], col
    for which in ("model", "ema"):
        a, b = straight.model_state(which), resumed.model_state(which)
        assert all(torch.equal(a[k], b[k]) for k in a), which


def test_resume_refuses_different_model_config(tmp_path: Path) -> None:
    train(make_model(), toy_loss, ToyData(), cfg_for(max_steps=3), tmp_path, model_config=MODEL_CONFIG, progress=False)
    other = {**MODEL_CONFIG, "hidden": 32, "blocks": {"n": 2}}
    with pytest.raises(ValueError, match=r"blocks\.n, hidden"):
        train(
            make_model(),
            toy_loss,
            ToyData(),
            cfg_for(max_steps=3),
            tmp_path,
            resume=True,
            model_config=other,
            progress=False,
        )


def test_resume_refuses_different_lr_scales(tmp_path: Path) -> None:
    """The optimiser's groups come from lr_scales: resuming with another set (or other values) is refused by name."""
    cfg = cfg_for(max_steps=3, lr_scales={"net.0": 10.0})
    train(make_model(), toy_loss, ToyData(), cfg, tmp_path, model_config=MODEL_CONFIG, progress=False)
    for other in ({}, {"net.0": 3.0}, {"net.0": 10.0, "net.3": 10.0}):
        with pytest.raises(ValueError, match=r"learning-rate scales were \{net\.0: 10\}"):
            train(
                make_model(),
                toy_loss,
                ToyData(),
                cfg_for(max_steps=6, lr_scales=other),
                tmp_path,
                resume=True,
                model_config=MODEL_CONFIG,
                progress=False,
            )
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3  # the refused resumes wrote nothing
    done = train(
        make_model(),
        toy_loss,
        ToyData(),
        cfg_for(max_steps=6, lr_scales={"net.0": 10.0}),
        tmp_path,
        resume=True,
        model_config=MODEL_CONFIG,
        progress=False,
    )
    assert done.step == 6


def test_fresh_run_refuses_existing_checkpoint_and_resume_needs_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        train(
            make_model(),
            toy_loss,
            ToyData(),
            cfg_for(max_steps=3),
            tmp_path,
            resume=True,
            model_config=MODEL_CONFIG,
            progress=False,
        )
    train(make_model(), toy_loss, ToyData(), cfg_for(max_steps=3), tmp_path, model_config=MODEL_CONFIG, progress=False)
    with pytest.raises(ValueError, match="resume=True"):
        train(
            make_model(), toy_loss, ToyData(), cfg_for(max_steps=3), tmp_path, model_config=MODEL_CONFIG, progress=False
        )
    # resuming a finished run is a no-op that returns the trained weights
    done = train(
        make_model(seed=5),
        toy_loss,
        ToyData(),
        cfg_for(max_steps=3),
        tmp_path,
        resume=True,
        model_config=MODEL_CONFIG,
        progress=False,
    )
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert done.step == 3
    assert all(torch.equal(saved[k], v) for k, v in done.model_state().items())


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    calls = {"n": 0}
    snapshot: dict[str, bytes] = {}

    def nan_at_7(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 6:  # the step-5 checkpoint has just been written
            snapshot["bytes"] = (tmp_path / "checkpoint.pt").read_bytes()
        loss, terms = toy_loss(model, batch, generator)
        if calls["n"] == 7:
            loss = loss * float("nan")
        return loss, terms

    with pytest.raises(NonFiniteLossError, match=r"nan at step 7") as info:
        train(
            make_model(),
            nan_at_7,
            ToyData(),
            cfg_for(max_steps=20, checkpoint_every=5),
            tmp_path,
            model_config=MODEL_CONFIG,
            progress=False,
        )
    assert info.value.step == 7 and math.isnan(info.value.value)
    assert (tmp_path / "checkpoint.pt").read_bytes() == snapshot["bytes"]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_short_epoch_is_reported(tmp_path: Path) -> None:
    class LyingData(ToyData):
        def n_batches(self, epoch: int) -> int:
            return 8  # but only 6 batches are yielded

        def iter_epoch(self, epoch: int, start_batch: int = 0):
            return itertools.islice(super().iter_epoch(epoch, start_batch), 6 - start_batch)

    with pytest.raises(RuntimeError, match="stopped after 6 batches"):
        train(
            make_model(),
            toy_loss,
            LyingData(),
            cfg_for(max_steps=20),
            tmp_path,
            model_config=MODEL_CONFIG,
            progress=False,
        )


def test_atomic_helpers_roundtrip(tmp_path: Path) -> None:
    write_json({"x": [1, 2]}, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    atomic_torch_save(tmp_path / "b.pt", {"w": torch.arange(3), "step": 4})
    loaded = load_checkpoint(tmp_path / "b.pt")
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pt"]


def test_training_steps_epochs_floor_and_override() -> None:
    from sclatent.train import training_steps

    assert training_steps(2.0, 7) == 14  # epochs x batches
    assert training_steps(0.5, 7) == 4  # rounded up
    assert training_steps(2.0, 7, min_steps=100) == 100  # a small dataset is raised to the floor
    assert training_steps(50.0, 7, min_steps=100) == 350  # a large one is not capped by it
    assert training_steps(2.0, 7, min_steps=100, max_steps=9) == 9  # --max-steps wins over both


def _synthetic_tokens(tmp_path: Path, condition_keys: list[str] | None = None) -> Path:
    """Tokens of 40 synthetic cells x 24 genes (all HVG) in tmp_path/tok, from tmp_path/train.h5ad."""
    from sclatent.synthetic import synthetic_counts
    from sclatent.tokens import tokenize

    adata = synthetic_counts(n_cells=40, n_genes=24, seed=3)
    adata.var["highly_variable"] = True
    adata.write_h5ad(tmp_path / "train.h5ad")
    tokenize(tmp_path / "train.h5ad", tmp_path / "tok", condition_keys=condition_keys, progress=False)
    return tmp_path / "tok"


def test_min_steps_raises_a_short_epoch_budget_end_to_end(tmp_path: Path) -> None:
    """train-vae / train-prior through the CLI: 1 epoch of 40 cells at batch 20 is 2 steps; --min-steps 5 trains 5."""
    from click.testing import CliRunner

    from sclatent.cli import main

    _synthetic_tokens(tmp_path, condition_keys=["cell_type"])
    common = ["--epochs", "1", "--batch-size", "20", "--device", "cpu", "--no-progress", "--preset", "tiny"]
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "-q",
            "train-vae",
            "--tokens",
            str(tmp_path / "tok"),
            "--outdir",
            str(tmp_path / "v"),
            "--min-steps",
            "5",
            "--decode-genes",
            "8",
            *common,
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "v" / "config.json").read_text())["train_config"]["max_steps"] == 5
    res = runner.invoke(
        main,
        [
            "-q",
            "train-vae",
            "--tokens",
            str(tmp_path / "tok"),
            "--outdir",
            str(tmp_path / "v0"),
            "--min-steps",
            "0",
            "--decode-genes",
            "8",
            *common,
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "v0" / "config.json").read_text())["train_config"]["max_steps"] == 2
    res = runner.invoke(
        main,
        [
            "-q",
            "train-vae",
            "--tokens",
            str(tmp_path / "tok"),
            "--outdir",
            str(tmp_path / "bad"),
            "--min-steps",
            "-1",
            *common,
        ],
    )
    assert res.exit_code != 0 and "--min-steps must be >= 0, got -1" in res.output
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_train_vae_trains_the_same_model_on_every_device_and_records_its_settings(tmp_path: Path) -> None:
    """Without --batch-size / --decode-genes train-vae takes the same values whatever the device (no hidden CPU
    variant), and config.json records every setting used; --decode-genes 0 decodes every gene."""
    from click.testing import CliRunner

    from sclatent.cli import main
    from sclatent.nn.vae import VAEConfig

    _synthetic_tokens(tmp_path)
    common = [
        "-q",
        "train-vae",
        "--tokens",
        str(tmp_path / "tok"),
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--preset",
        "tiny",
    ]
    runner = CliRunner()
    res = runner.invoke(main, [*common, "--outdir", str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "cpu" / "config.json").read_text())
    defaults = {p.name: p.default for p in main.commands["train-vae"].params}
    assert config["train_config"]["batch_size"] == defaults["batch_size"]
    assert config["metadata"]["run"]["decode_genes"] == defaults["decode_genes"]
    assert (config["precision_used"], config["train_config"]["device"]) == ("fp32", "cpu")
    assert config["model_config"] == VAEConfig.preset("tiny", 24).to_dict()
    res = runner.invoke(main, [*common, "--outdir", str(tmp_path / "all"), "--decode-genes", "0", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "all" / "config.json").read_text())["metadata"]["run"]["decode_genes"] == 0


def test_train_vae_theta_lr_scale_speeds_up_the_dispersions_only(tmp_path: Path) -> None:
    """theta_lr_scale (10 by default) puts the per-gene NB dispersion table in its own optimiser group with lr x scale
    (recorded in config.json); in the same steps its dispersions move further from their start than at scale 1; a
    likelihood without that table gets no group; a non-positive value is refused."""
    from sclatent.io import InputError
    from sclatent.nn.vae import THETA_INIT
    from sclatent.train_vae import VAETraining, train_vae

    _synthetic_tokens(tmp_path)

    def run(name: str, **kw: object) -> dict:
        tcfg = TrainConfig(max_steps=1, batch_size=20, warmup_frac=0.0, device="cpu")
        train_vae(
            tmp_path / "tok", tmp_path / name, VAETraining(preset="tiny", max_steps=10, **kw), tcfg, progress=False
        )
        return json.loads((tmp_path / name / "config.json").read_text())

    moved = {}
    for scale in (1.0, 20.0):
        config = run(f"s{scale}", theta_lr_scale=scale)
        ckpt = load_checkpoint(tmp_path / f"s{scale}" / "checkpoint.pt")
        moved[scale] = (ckpt["model"]["head.log_theta.weight"][1:, 0] - THETA_INIT).abs().mean().item()
        expected = {} if scale == 1.0 else {"head.log_theta": 20.0}
        assert config["train_config"]["lr_scales"] == expected
        assert sorted(g["lr_scale"] for g in ckpt["optimizer"]["param_groups"]) == [1.0, *expected.values()]
    assert moved[20.0] > 5 * moved[1.0] > 0
    assert run("default")["train_config"]["lr_scales"] == {"head.log_theta": 10.0}
    assert run("pois", model_overrides={"likelihood": "poisson"})["train_config"]["lr_scales"] == {}
    with pytest.raises(InputError, match="theta_lr_scale"):
        run("bad", theta_lr_scale=0.0)
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------------------
# the background loader


def test_prefetcher_keeps_order_raises_where_the_item_was_and_stops():
    from sclatent.train import Prefetcher

    assert list(Prefetcher(range(50), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad shard")

    items = Prefetcher(failing())
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(ValueError, match="bad shard"):
        next(items)
    endless = Prefetcher(itertools.count(), depth=2)
    assert next(endless) == 0
    endless.close()  # a run that stops mid-epoch
    assert not endless._thread.is_alive()


def test_run_does_not_depend_on_prefetch(tmp_path):
    """Batches read ahead in a thread (the default) or in the loop: the same losses, to the bit."""
    cfg = TrainConfig(max_steps=9, batch_size=10, lr=1e-2, log_every=1, checkpoint_every=100, seed=3)
    for name, depth in (("inline", 0), ("ahead", 3)):
        train(
            make_model(),
            toy_loss,
            ToyData(),
            cfg,
            tmp_path / name,
            model_config=MODEL_CONFIG,
            progress=False,
            prefetch=depth,
        )
    rows = [read_history(tmp_path / name / "history.csv")[1] for name in ("inline", "ahead")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
