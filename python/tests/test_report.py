"""Tests of sclatent.report: a complete, self-contained page from real pipeline outputs; rendering in headless
Chromium (console, exceptions, network, every figure decoded); missing optional inputs; one-line input errors.

The inputs are made once per module by running the real steps on the bundled mixology data (tiny presets,
20 optimiser steps each, two generated replicates, a Gaussian-prior baseline).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

from sclatent import report as R
from sclatent.cli import main
from sclatent.evaluate import run_evaluate
from sclatent.report import cells as RC
from sclatent.report import comparison as RM
from sclatent.report import html as RH
from sclatent.report import inputs as RI

REPO = Path(__file__).resolve().parents[2]
MIXOLOGY = REPO / "assets" / "test_data" / "mixology.h5ad"
SECTIONS = (
    "run-summary",
    "data-summary",
    "training",
    "reconstruction",
    "metrics",
    "per-class",
    "held-out",
    "umap",
    "markers",
)
FIGURES = (
    "fig-training-vae",
    "fig-training-prior",
    "fig-per-class-cell-line",
    "fig-per-class-protocol",
    "fig-per-class-cell-line-protocol",
    "fig-umap-source",
    "fig-umap-cell-line",
    "fig-umap-protocol",
    "fig-markers",
)
TABLES = (
    "table-steps",
    "table-versions",
    "table-trace",
    "table-filters",
    "table-classes-cell-line",
    "table-classes-protocol",
    "table-reconstruction",
    "table-overall",
    "table-labels",
    "table-per-class-cell-line",
    "table-per-class-protocol",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Tests on the pipeline's real outputs: the module's first such test pays ~30-45 s (training both stages,
# sampling, EVALUATE, numba's JIT of UMAP); the rest take seconds each.
pipeline = pytest.mark.slow


def _cli(*args: Any) -> Any:
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    return result


def _ok(*args: Any) -> None:
    result = _cli(*args)
    assert result.exit_code == 0, (args[0], result.output, result.exception)


# ----------------------------------------------------------------------------------------------------------
# inputs: the real steps on the bundled data, once per module
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pipeline")
    sheet = d / "s.csv"
    sheet.write_text(f"dataset,h5ad,split,batch,condition_keys\nmix,{MIXOLOGY},all,,cell_line;protocol\n")
    short = ("--max-steps", 20, "--no-progress", "--device", "cpu")
    _ok(
        "prepare", "--samplesheet", sheet, "--outdir", d / "p", "--n-hvg", 300, "--min-cells", 3, "--test-fraction", 0.5
    )
    _ok(
        "tokenize",
        "--train",
        d / "p/train.h5ad",
        "--test",
        d / "p/test.h5ad",
        "--outdir",
        d / "tok",
        "--max-tokens",
        512,
        "--no-progress",
    )
    _ok(
        "train-vae",
        "--tokens",
        d / "tok",
        "--outdir",
        d / "vae",
        "--preset",
        "tiny",
        "--batch-size",
        32,
        "--decode-genes",
        128,
        *short,
    )
    _ok("encode", "--model", d / "vae", "--tokens", d / "tok", "--outdir", d / "enc", "--device", "cpu")
    _ok(
        "train-prior",
        "--latents",
        d / "enc/latents.npz",
        "--outdir",
        d / "prior",
        "--preset",
        "tiny",
        "--batch-size",
        64,
        *short,
    )
    _ok("bundle", "--vae", d / "vae", "--prior", d / "prior", "--out", d / "model.pt")
    for r in (0, 1):
        _ok(
            "sample",
            "--model",
            d / "model.pt",
            "--like",
            d / "p/test.h5ad",
            "--out",
            d / f"g{r}.h5ad",
            "--replicate",
            r,
            "--device",
            "cpu",
        )
    _ok("gather", d / "g0.h5ad", d / "g1.h5ad", "--out", d / "gen.h5ad")
    _ok(
        "sample",
        "--model",
        d / "vae",
        "--prior-kind",
        "gaussian",
        "--like",
        d / "p/test.h5ad",
        "--out",
        d / "base.h5ad",
        "--device",
        "cpu",
    )
    # classes need >= 10 cells on both sides here (EVALUATE's default of 20 would skip most classes of 200 cells)
    run_evaluate(
        d / "p/test.h5ad",
        d / "gen.h5ad",
        d / "ev",
        reconstruction=d / "enc/reconstruction.json",
        dataset="mix",
        min_cells_per_class=10,
    )
    run_evaluate(d / "p/test.h5ad", d / "base.h5ad", d / "evb", dataset="mix", min_cells_per_class=10, floor=False)
    trace = d / "trace.txt"  # the header and fields of nextflow.config's trace block
    fields = "task_id hash native_id process tag name status exit cpus submit complete duration realtime %cpu peak_rss"
    rows = [
        "1 ab/cdef12 101 SCLATENT:PREPARE mix SCLATENT:PREPARE~(mix) COMPLETED 0 2 2025-01-02~10:00:00.000 "
        "2025-01-02~10:00:05.100 5.1s 2.0s 95.0% 310~MB",
        "2 12/345678 102 SCLATENT:PREPARE other SCLATENT:PREPARE~(other) COMPLETED 0 2 2025-01-02~10:00:01.000 "
        "2025-01-02~10:00:05.000 4.0s 1.5s 90.0% 300~MB",
        "3 cd/ef0123 103 SCLATENT:TRAIN_VAE mix SCLATENT:TRAIN_VAE~(mix) COMPLETED 0 4 2025-01-02~10:00:06.000 "
        "2025-01-02~10:12:08.000 12m~2s 12m 180.2% 1.2~GB",
    ]
    # the fields of nextflow.config's trace block (a subset), tab-separated; '~' stands for a space here
    trace.write_text("\n".join("\t".join(c.replace("~", " ") for c in r.split()) for r in [fields, *rows]) + "\n")
    return {
        "prepare": d / "p/prepare.json",
        "manifest": d / "tok/manifest.json",
        "vae_history": d / "vae/history.csv",
        "prior_history": d / "prior/history.csv",
        "reconstruction": d / "enc/reconstruction.json",
        "metrics": d / "ev/metrics.json",
        "real": d / "p/test.h5ad",
        "generated": d / "gen.h5ad",
        "baseline": d / "evb/metrics.json",
        "trace": trace,
        "dir": d,
    }


def _full_args(run: dict[str, Path], out: Path) -> list[Any]:
    return [
        "report",
        "--out",
        out,
        "--prepare",
        run["prepare"],
        "--manifest",
        run["manifest"].parent,
        "--vae-history",
        run["vae_history"],
        "--prior-history",
        run["prior_history"].parent,
        "--reconstruction",
        run["reconstruction"],
        "--metrics",
        run["metrics"],
        "--real",
        run["real"],
        "--generated",
        run["generated"],
        "--baseline",
        f"gaussian_prior={run['baseline']}",
        "--trace",
        run["trace"],
        "--max-cells",
        150,
        "--seed",
        0,
    ]


@pytest.fixture(scope="module")
def full_report(run) -> Path:
    """The report with every input, through the CLI."""
    out = run["dir"] / "report.html"
    _ok(*_full_args(run, out))
    return out


class _Page(HTMLParser):
    """Collects ids, tags, and every src/href of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.tags: list[str] = []
        self.links: list[str] = []
        self.images: list[tuple[str | None, str]] = []  # (id of the enclosing figure, src)
        self._figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids[a["id"]] = tag
        for name in ("src", "href", "srcset", "data", "action", "poster"):
            if a.get(name):
                self.links.append(a[name])
        if tag == "figure":
            self._figure = a.get("id")
        if tag == "img":
            self.images.append((self._figure, a.get("src") or ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None


def _parse(path: Path) -> tuple[str, _Page]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return text, page


def _section(text: str, section_id: str) -> str:
    start = text.index(f'<section id="{section_id}">')
    return text[start : text.index("</section>", start)]


# ----------------------------------------------------------------------------------------------------------
# the complete report
# ----------------------------------------------------------------------------------------------------------
@pipeline
def test_report_is_self_contained_and_complete(full_report, run):
    text, page = _parse(full_report)
    for ident in (*SECTIONS, *FIGURES, *TABLES):
        assert ident in page.ids, f"missing element #{ident}"
    assert all(page.ids[s] == "section" for s in SECTIONS) and all(page.ids[f] == "figure" for f in FIGURES)
    # nothing external: no script, stylesheet link, frame, remote URL, CSS url() or @import
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "url(" not in text and "@import" not in text
    for link in page.links:
        assert link.startswith("#") or link.startswith("data:image/png;base64,"), link
    # every figure is one inline PNG that decodes
    assert sorted(f for f, _ in page.images) == sorted(FIGURES)
    for fig, src in page.images:
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000, fig
    # the numbers are the inputs' numbers
    metrics = json.loads(run["metrics"].read_text())
    baseline = json.loads(run["baseline"].read_text())
    overall = _section(text, "metrics")
    w2 = metrics["generation"]["overall"]["w2"]
    assert f"{RH.fmt(w2['mean'])} ± {w2['sem']:.2g}" in overall
    assert RH.fmt(metrics["real_vs_real"]["overall"]["w2"]) in overall
    assert RH.fmt(metrics["generated_vs_real_half"]["overall"]["w2"]) in overall
    # the comparable pair first: the model at the floor's size, then the floor; all test cells after
    head = overall.split('<table id="table-overall">')[1].split("</thead>")[0]
    assert head.index("sclatent at the floor&#x27;s size") < head.index("the floor (") < head.index("all test cells")
    assert RH.fmt(baseline["generation"]["overall"]["w2"]["mean"]) in overall and "baseline: gaussian_prior" in overall
    rec = json.loads(run["reconstruction"].read_text())["metrics"]
    assert RH.fmt(rec["re_nll_gene_sum_cell_mean"]) in _section(text, "reconstruction")
    # the trace rows of this dataset only
    summary = _section(text, "run-summary")
    assert "SCLATENT:TRAIN_VAE (mix)" in summary and "SCLATENT:PREPARE (other)" not in summary
    # the run's wall time from the trace (10:00:00 to 10:12:08, every dataset), not the sum of the steps' records
    assert "Run wall time: 12\u00a0min 08\u00a0s" in summary
    prep = json.loads(run["prepare"].read_text())
    assert f"<td class=num>{prep['split']['test']}</td>" in _section(text, "data-summary")
    assert 'class="missing"' not in text  # every input given: nothing reported missing
    # the tiny presets of the fixture, said before any section
    assert text.index('id="read-first"') < text.index('<section id="run-summary">')
    assert "Test-size model." in text


@pipeline
def test_class_values_aggregate_replicates(run):
    metrics = json.loads(run["metrics"].read_text())
    values = RM.class_values(metrics, "cell_line")
    reps = metrics["generation_per_replicate"]
    assert len(reps) == 2 and values
    for cls, entry in values.items():
        w2 = [r["per_class"]["cell_line"]["classes"][cls]["w2"] for r in reps]
        assert entry["w2"]["mean"] == pytest.approx(np.mean(w2))
        assert entry["w2"]["sem"] == pytest.approx(np.std(w2, ddof=1) / np.sqrt(2))


@pipeline
def test_umap_embedding_is_seeded(run):
    inputs = RI.load_inputs(real=run["real"], generated=run["generated"], metrics=run["metrics"])
    cells = RC.cell_sample(inputs, max_cells=60, seed=3)
    assert (cells.real.n_obs, cells.generated.n_obs) == (60, 60)
    assert set(cells.generated.obs["replicate"]) == {0}  # the first replicate only
    a, _ = RC.umap_embedding(cells, 10, seed=3)
    b, _ = RC.umap_embedding(RC.cell_sample(inputs, max_cells=60, seed=3), 10, seed=3)
    assert a.shape == (120, 2) and np.array_equal(a, b)
    other = RC.cell_sample(inputs, max_cells=60, seed=4)
    assert list(other.real.obs_names) != list(cells.real.obs_names)


# ----------------------------------------------------------------------------------------------------------
# rendering in headless Chromium, driven over the DevTools protocol (a pipe; standard library only)
# ----------------------------------------------------------------------------------------------------------
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
FIGURE_STATUS_JS = """JSON.stringify(Array.from(document.querySelectorAll('figure')).map(f => {
  const img = f.querySelector('img');
  return {id: f.id, loaded: !!img && img.complete && img.naturalWidth > 0, width: img ? img.naturalWidth : 0,
          shown: !!img && img.getBoundingClientRect().width > 0};
}))"""


class _DevTools:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (NUL-separated JSON on fds 3/4)."""

    def __init__(self, exe: str, profile: str) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # bash moves the pipe ends onto fds 3 (commands in) and 4 (replies out), then becomes chromium. Via two
        # spare numbers (only these two fds are open in the child), since the pipe ends may themselves be 3 or 4.
        spare_r, spare_w = max(to_child_r, from_child_w) + 10, max(to_child_r, from_child_w) + 11
        moves = [f"{spare_r}<&{to_child_r}", f"{spare_w}>&{from_child_w}"]
        moves += [f"{fd}<&-" for fd in (to_child_r, from_child_w) if fd not in (3, 4)]
        moves += [f"3<&{spare_r}", f"4>&{spare_w}", f"{spare_r}<&-", f"{spare_w}>&-"]
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" {" ".join(moves)}',
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(to_child_r, from_child_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, session: str | None = None, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._next(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._next(timeout)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):  # already gone
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def render_in_chromium(page: Path, screenshot: Path | None = None) -> dict[str, Any]:
    """Load `page` in headless Chromium; return console errors, exceptions, non-local requests and figure status."""
    exe = shutil.which("chromium")
    with tempfile.TemporaryDirectory() as profile:
        cdp = _DevTools(exe, profile)
        try:
            target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
            sid = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                cdp.call(f"{domain}.enable", session=sid)
            cdp.call(
                "Emulation.setDeviceMetricsOverride",
                session=sid,
                width=1280,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            cdp.call("Page.navigate", session=sid, url=page.resolve().as_uri())
            cdp.wait_event("Page.loadEventFired")
            status = json.loads(
                cdp.call("Runtime.evaluate", session=sid, expression=FIGURE_STATUS_JS, returnByValue=True)["result"][
                    "value"
                ]
            )
            if screenshot is not None:
                height = int(cdp.call("Page.getLayoutMetrics", session=sid)["cssContentSize"]["height"])
                cdp.call(
                    "Emulation.setDeviceMetricsOverride",
                    session=sid,
                    width=1280,
                    height=min(height, 16_000),
                    deviceScaleFactor=1,
                    mobile=False,
                )
                shot = cdp.call("Page.captureScreenshot", session=sid, format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            time.sleep(0.3)  # let late console / log events arrive
            cdp.call("Runtime.evaluate", session=sid, expression="1")
        finally:
            cdp.close()

    def params(method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in cdp.events if e.get("method") == method]

    return {
        "console_errors": [
            p for p in params("Runtime.consoleAPICalled") if p["type"] in ("error", "assert", "warning")
        ],
        "exceptions": params("Runtime.exceptionThrown"),
        "log_errors": [p["entry"] for p in params("Log.entryAdded") if p["entry"]["level"] in ("error", "warning")],
        "remote_requests": [
            p["request"]["url"]
            for p in params("Network.requestWillBeSent")
            if not p["request"]["url"].startswith(("data:", "file:"))
        ],
        "failed_loads": params("Network.loadingFailed"),
        "figures": status,
    }


needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="headless rendering test needs Debian's chromium (apt-get install -y chromium); not installed here",
)


@needs_chromium
def test_chromium_harness_sees_errors(tmp_path):
    """The harness itself: a page with a console error, an exception and a broken image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><figure id="f"><img src="data:image/png;base64,AAAA"></figure>'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>'
    )
    result = render_in_chromium(bad)
    assert result["console_errors"] and result["exceptions"]
    assert result["figures"] == [{"id": "f", "loaded": False, "width": 0, "shown": True}]


@needs_chromium
@pipeline
def test_report_renders_in_chromium(full_report, tmp_path):
    shot = Path(os.environ.get("SCLATENT_REPORT_SCREENSHOT", tmp_path / "report.png"))
    result = render_in_chromium(full_report, screenshot=shot)
    assert result["console_errors"] == [] and result["exceptions"] == [] and result["log_errors"] == []
    assert result["remote_requests"] == [] and result["failed_loads"] == []
    assert sorted(f["id"] for f in result["figures"]) == sorted(FIGURES)
    for fig in result["figures"]:
        assert fig["loaded"] and fig["shown"] and fig["width"] > 200, fig
    assert shot.read_bytes().startswith(PNG_MAGIC)


# ----------------------------------------------------------------------------------------------------------
# missing optional inputs: the section says what is missing
# ----------------------------------------------------------------------------------------------------------
def test_nothing_given_still_builds_every_section(tmp_path):
    out = tmp_path / "r.html"
    summary = R.make_report(out)
    text, page = _parse(out)
    assert all(s in page.ids for s in SECTIONS) and summary["figures"] == []
    assert set(summary["missing"]) == set(SECTIONS) - {"run-summary"}
    assert "No metrics.json given (--metrics)" in _section(text, "metrics")
    assert "Needs both the real test cells (--real)" in _section(text, "umap")


@pipeline
def test_no_prior_history_and_no_cells(run, tmp_path):
    out = tmp_path / "r.html"
    summary = R.make_report(out, prepare=run["prepare"], vae_history=run["vae_history"], metrics=run["metrics"])
    text, _ = _parse(out)
    assert "fig-training-vae" in summary["figures"] and "fig-training-prior" not in summary["figures"]
    assert "no history given (--prior-history)" in _section(text, "training")
    assert not any(f.startswith(("fig-umap", "fig-markers")) for f in summary["figures"])
    assert "fig-per-class-cell-line" in summary["figures"]
    # reconstruction falls back on the copy EVALUATE carried into metrics.json
    assert "from metrics.json" in _section(text, "reconstruction")


@pipeline
def test_no_floor_and_empty_history(run, tmp_path):
    metrics = json.loads(run["metrics"].read_text())
    metrics["real_vs_real"] = metrics["generated_vs_real_half"] = None  # what EVALUATE --no-floor writes
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior/history.csv").write_text("step,epoch,loss\n")  # SAMPLE's stub writes this
    out = tmp_path / "r.html"
    summary = R.make_report(out, metrics=tmp_path / "m.json", prior_history=tmp_path / "prior")
    text, _ = _parse(out)
    assert "floor was not computed" in _section(text, "metrics")
    head = _section(text, "metrics").split('<table id="table-overall">')[1].split("</thead>")[0]
    assert "sclatent, all test cells (mean ± SEM of 2 replicates)" in head and "floor" not in head
    assert "has no rows" in _section(text, "training")
    assert "fig-per-class-cell-line" in summary["figures"]  # bars without the floor tick


def _without_keys(doc: dict[str, Any]) -> dict[str, Any]:
    """What EVALUATE writes for a dataset without condition keys: no label or per-class entries."""
    parts = [doc["generation"], *doc["generation_per_replicate"], doc["real_vs_real"], doc["generated_vs_real_half"]]
    for part in parts:
        part["labels"], part["per_class"] = {}, {}
    return {**doc, "condition_keys": []}


@pipeline
def test_no_condition_keys(run, tmp_path):
    # built from the full metrics.json: metrics.evaluate(condition_keys=[]) currently fails (reported to the lead)
    (tmp_path / "m.json").write_text(json.dumps(_without_keys(json.loads(run["metrics"].read_text()))))
    out = tmp_path / "r.html"
    summary = R.make_report(
        out, metrics=tmp_path / "m.json", real=run["real"], generated=run["generated"], max_cells=80
    )
    text, _ = _parse(out)
    assert summary["figures"] == ["fig-umap-source"]
    assert "No condition keys: no label metrics." in _section(text, "metrics")
    assert "No condition keys: no per-class charts." in _section(text, "per-class")
    assert "no condition keys" in _section(text, "markers")


@pipeline
def test_single_class(run, tmp_path):
    for name in ("real", "generated"):
        adata = ad.read_h5ad(run[name])
        adata[adata.obs["cell_line"] == "H1975"].copy().write_h5ad(tmp_path / f"{name}.h5ad")
    run_evaluate(
        tmp_path / "real.h5ad",
        tmp_path / "generated.h5ad",
        tmp_path / "ev",
        condition_keys=["cell_line"],
        min_cells_per_class=10,
    )
    out = tmp_path / "r.html"
    summary = R.make_report(
        out, metrics=tmp_path / "ev/metrics.json", real=tmp_path / "real.h5ad", generated=tmp_path / "generated.h5ad"
    )
    text, _ = _parse(out)
    assert {"fig-per-class-cell-line", "fig-umap-source", "fig-umap-cell-line"} <= set(summary["figures"])
    assert "fig-markers" not in summary["figures"]
    assert "at least 2 classes" in _section(text, "markers")


# ----------------------------------------------------------------------------------------------------------
# bad inputs: one line, exit status 2, no report written
# ----------------------------------------------------------------------------------------------------------
def _bad_json(d: Path) -> Path:
    (d / "bad.json").write_text("{not json")
    return d / "bad.json"


def _no_overall(d: Path) -> Path:
    (d / "m.json").write_text(json.dumps({"generation": {"per_class": {}}}))
    return d / "m.json"


@pipeline
@pytest.mark.parametrize(
    "case, expected",
    [
        (lambda run, d: ["--metrics", d / "absent.json"], "absent.json: file does not exist"),
        (lambda run, d: ["--metrics", _bad_json(d)], "bad.json: not valid JSON"),
        (lambda run, d: ["--metrics", run["prepare"]], "not a valid EVALUATE metrics.json (no 'generation' entry)"),
        (
            lambda run, d: ["--metrics", _no_overall(d)],
            "m.json: not a valid EVALUATE metrics.json ('generation' has no 'overall' metrics)",
        ),
        (lambda run, d: ["--baseline", run["baseline"]], "expected NAME=metrics.json"),
        (lambda run, d: ["--baseline", f"b={run['prepare']}"], "not a valid EVALUATE metrics.json (baseline 'b')"),
        (lambda run, d: ["--vae-history", run["prepare"]], "not a training history CSV"),
        (lambda run, d: ["--trace", run["prepare"]], "not a Nextflow execution trace"),
        (lambda run, d: ["--real", run["prepare"], "--generated", run["generated"]], "not a readable .h5ad file"),
        (lambda run, d: ["--max-cells", 5], "--max-cells must be at least 10, got 5"),
        (
            lambda run, d: ["--real", run["real"], "--generated", run["generated"], "--marker-key", "tissue"],
            "--marker-key 'tissue' is not a condition key",
        ),
    ],
    ids=[
        "missing-file",
        "invalid-json",
        "wrong-json",
        "no-overall",
        "baseline-format",
        "baseline-content",
        "history",
        "trace",
        "h5ad",
        "max-cells",
        "marker-key",
    ],
)
def test_bad_input_is_one_line(run, tmp_path, case, expected):
    out = tmp_path / "r.html"
    args = case(run, tmp_path)
    if "--metrics" not in args:
        args = ["--metrics", run["metrics"], *args]
    result = _cli("report", "--out", out, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sclatent report: error: ") and expected in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob(".r.*"))


def test_parse_baselines_and_formats():
    assert R.parse_baselines(["a=x.json", " b = y/z.json "]) == {"a": Path("x.json"), "b": Path("y/z.json")}
    with pytest.raises(RI.InputError, match="given twice"):
        R.parse_baselines(["a=x.json", "a=y.json"])
    assert RH.fmt_stat({"mean": 17.7612, "sem": 0.05678}) == "17.76 ± 0.057"
    assert RH.fmt_stat({"mean": 0.5, "sem": None}) == "0.5" and RH.fmt(None) == "—" and RH.fmt(float("nan")) == "—"
    assert RH.fmt_seconds(75.2) == "1\u00a0min 15\u00a0s" and RH.fmt_seconds(None) == "not recorded"
    assert RH.slug("cell_line|protocol") == "cell-line-protocol"


@pipeline
def test_history_folder_reads_config(run):
    history = RI.load_history(run["vae_history"].parent)
    assert history.config is not None and history.config["metadata"]["stage"] == "vae"
    assert list(history.history.columns[:3]) == ["step", "epoch", "loss"] and len(history.history) >= 1


# ----------------------------------------------------------------------------------------------------------
# what a biologist reads: comparable numbers side by side, one per-class rule, warnings first
# ----------------------------------------------------------------------------------------------------------
def _part(values: dict[str, float], classes: dict[str, float], n: tuple[int, int] = (40, 40), knn: float = 0.4):
    """One `metrics.evaluate` output: the same value for every metric of a class (W2 = the number given)."""
    per = {c: {m: v for m in (*RM.DISTRIBUTION_METRICS, "n_real", "n_generated")} for c, v in classes.items()}
    return {
        "n_real": n[1],
        "n_generated": n[0],
        "overall": {m: values.get(m, 1.0) for m in RM.DISTRIBUTION_METRICS},
        "labels": {"cell_type": {"knn_f1": knn}},
        "per_class": {"cell_type": {"classes": per, "n_classes": len(per), "skipped": []}},
    }


def _doc(half: dict[str, Any], floor: dict[str, Any], reps: list[dict[str, Any]]) -> dict[str, Any]:
    from sclatent.metrics import aggregate_replicates

    for r in reps:
        for group in r["per_class"].values():
            group["summary"] = {
                m: RM.mean_sem([v[m] for v in group["classes"].values()]) for m in RM.DISTRIBUTION_METRICS
            }
    return {
        "dataset": "d",
        "condition_keys": ["cell_type"],
        "generation": aggregate_replicates(reps),
        "generation_per_replicate": reps,
        "real_vs_real": floor,
        "generated_vs_real_half": half,
    }


def test_mode_collapse_is_said_in_words_and_only_when_far_below_the_floor():
    floor = _part({"recall": 0.8, "coverage": 0.9}, {"A": 1.0, "B": 1.0}, knn=0.43)
    collapsed = _part({"recall": 0.06, "coverage": 0.5}, {"A": 2.0, "B": 2.0}, knn=0.14)
    reps = [_part({}, {"A": 3.0, "B": 3.0}) for _ in range(2)]
    found = RM.collapse_findings(_doc(collapsed, floor, reps))
    assert found == [("recall", 0.06, 0.8), ("kNN-F1 of cell_type", 0.14, 0.43)]  # coverage 0.5 of 0.9: not far
    inputs = RI.ReportInputs(dataset="d", metrics=_doc(collapsed, floor, reps))
    box = RM.read_first(inputs)
    assert 'id="read-first"' in box and "possible mode collapse" in box
    assert "recall 0.06 against 0.8; kNN-F1 of cell_type 0.14 against 0.43" in box
    fine = _part({"recall": 0.7, "coverage": 0.85}, {"A": 1.1, "B": 1.2}, knn=0.4)
    assert (
        RM.collapse_findings(_doc(fine, floor, reps)) == []
        and RM.read_first(RI.ReportInputs(dataset="d", metrics=_doc(fine, floor, reps))) == ""
    )


def test_per_class_tables_average_the_same_classes_in_every_column():
    """The floor's halves evaluate only A and B: every column of the per-class table is the mean over A and B."""
    floor = _part({}, {"A": 1.0, "B": 3.0})
    half = _part({}, {"A": 2.0, "B": 4.0})
    reps = [_part({}, {"A": 5.0, "B": 7.0, "C": 100.0}), _part({}, {"A": 6.0, "B": 8.0, "C": 200.0})]
    inputs = RI.ReportInputs(dataset="d", metrics=_doc(half, floor, reps))
    cols = RM.metric_columns(inputs)
    group_cols, classes, note = RM.per_class_plan(cols, "cell_type")
    assert classes == ["A", "B"] and len(group_cols) == 3 and "of 3 evaluated on all test cells" in note
    assert [c.class_mean("cell_type", "w2", classes)["mean"] for c in group_cols] == [3.0, 2.0, 6.5]
    assert group_cols[2].class_mean("cell_type", "w2", classes)["sem"] == pytest.approx(0.5)  # over replicates
    text = RM.section_metrics(inputs).html()
    table_html = text.split('id="table-per-class-cell-type"')[1].split("</table>")[0]
    assert "103" not in table_html and "6.5 ± 0.5" in table_html  # C (100, 200) is in no column's mean
    # a floor with one class: no floor column (a mean over one class is no per-class summary)
    one = RI.ReportInputs(dataset="d", metrics=_doc(_part({}, {"A": 2.0}), _part({}, {"A": 1.0}), reps))
    group_cols, classes, note = RM.per_class_plan(RM.metric_columns(one), "cell_type")
    assert [c.comparable for c in group_cols] == [False] and classes == ["A", "B", "C"]
    assert "enough cells in 1 class," in note


def test_per_class_bars_have_a_floor_tick_on_every_bar(tmp_path):
    floor = _part({}, {"A": 1.0, "B": 3.0})
    half = _part({}, {"A": 2.0, "B": 4.0})
    reps = [_part({}, {"A": 5.0, "B": 7.0, "C": 9.0}) for _ in range(2)]
    doc = _doc(half, floor, reps)
    doc["generation"]["settings"] = {"min_cells_per_class": 11}
    fig, classes, with_floor = RM.per_class_figure(doc, {}, "cell_type")
    assert with_floor and classes == ["A", "B"]
    ticks = [c for c in fig.axes[0].collections if c.get_label() == "real vs real: the floor"]
    assert len(ticks) == 1 and len(ticks[0].get_offsets()) == 2 and not np.isnan(ticks[0].get_offsets()).any()
    caption = RM.section_per_class(RI.ReportInputs(dataset="d", metrics=doc)).html()
    assert "Not drawn (1: C): fewer than 11 real cells in a half" in caption
    # no class with a floor: all-cells bars, and the caption does not ask for a comparison with a tick
    doc = _doc(_part({}, {}), _part({}, {}), reps)
    fig, classes, with_floor = RM.per_class_figure(doc, {}, "cell_type")
    assert not with_floor and classes == ["A", "B", "C"]
    assert "No floor: no class has" in RM.section_per_class(RI.ReportInputs(dataset="d", metrics=doc)).html()


@pipeline
def test_run_summary_lists_every_step_and_what_it_did_not_record(run, tmp_path):
    out = tmp_path / "r.html"
    R.make_report(out, **{k: run[k] for k in ("prepare", "manifest", "vae_history", "prior_history")})
    summary = _section(out.read_text(), "run-summary")
    # no trace: the sum of the records, said to be less than the run's wall time
    assert "Sum of the steps&#x27; records" in summary or "Sum of the steps' records" in summary
    assert "no Nextflow trace given" in summary
    env = summary.split("Python and platform of each step")[1].split("</table>")[0]
    for step in ("PREPARE", "TOKENIZE", "TRAIN_VAE", "ENCODE", "TRAIN_PRIOR", "SAMPLE", "EVALUATE", "REPORT"):
        assert f"<td>{step}" in env, step
    assert "not recorded" in env.split("<td>TRAIN_VAE</td>")[1].split("</tr>")[0]
    assert "none recorded by" not in summary  # every given step recorded its time


@pipeline
def test_zero_kl_panel_is_left_out_and_said(run, tmp_path):
    history = (run["vae_history"]).read_text().splitlines()
    assert "kl" in history[0].split(",")
    out = tmp_path / "r.html"
    summary = R.make_report(out, vae_history=run["vae_history"])
    training = _section(out.read_text(), "training")
    assert "fig-training-vae" in summary["figures"]
    assert "Not drawn: kl, 0 at every step (a deterministic encoder, β = 0, has no KL term)" in training


@pipeline
def test_umap_caption_is_said_once(full_report):
    umap = _section(full_report.read_text(), "umap")
    assert umap.count("seeded subsample") == 1 and umap.count("<figcaption>") == 3
