"""Every module has an nf-core-style meta.yml that names its inputs and outputs as its main.nf declares them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from nfhelpers import REPO

MODULES = sorted(p.parent for p in (REPO / "modules" / "local").glob("*/main.nf"))
ELEMENT = re.compile(r"\b(val|path|env|eval|stdin|each)\(\s*(?:'([^']*)'|\"([^\"]*)\"|([A-Za-z_]\w*))")
PLAIN = re.compile(r"^(val|path)\s+(?:'([^']*)'|\"([^\"]*)\"|([A-Za-z_]\w*))\s*$")


def _block(text: str, start: str, end: str) -> list[str]:
    """The code lines (no comments, no blanks) between `start:` and `end:` of the process."""
    body = text.split(f"\n    {start}:\n", 1)[1].split(f"\n    {end}:\n", 1)[0]
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("//")]


def _names(line: str) -> list[str]:
    """The element names of one input/output declaration: variable names, or the file names / patterns."""
    line = line.split(", emit:")[0].strip()
    plain = PLAIN.match(line)
    if plain:
        return [next(g for g in plain.groups()[1:] if g is not None)]
    return [next(g for g in m.groups()[1:] if g is not None) for m in ELEMENT.finditer(line)]


def declared(module: Path) -> tuple[list[list[str]], dict[str, list[str]], list[list[str]]]:
    """(input channels as lists of names, {emit: names}, versions topic tuples) of a module's main.nf."""
    text = (module / "main.nf").read_text()
    inputs = [_names(ln) for ln in _block(text, "input", "output")]
    outputs, topics = {}, []
    for ln in _block(text, "output", "when"):
        emit = re.search(r"emit:\s*(\w+)", ln)
        if emit:
            outputs[emit.group(1)] = _names(ln)
        elif "topic: versions" in ln:
            topics.append(_names(ln.split(", topic:")[0]))
    return inputs, outputs, topics


def _keys(channel: list[dict]) -> list[str]:
    assert all(isinstance(e, dict) and len(e) == 1 for e in channel), channel
    return [next(iter(e)) for e in channel]


def test_every_module_is_found():
    assert {m.name for m in MODULES} == {
        "check_samplesheet", "prepare", "tokenize", "train_vae", "encode", "train_prior", "bundle", "sample",
        "gather", "evaluate", "report", "embed", "transfer",
    }


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_meta_yml_names_the_inputs_and_outputs(module):
    path = module / "meta.yml"
    assert path.is_file(), f"{module.name}: no meta.yml"
    meta = yaml.safe_load(path.read_text())
    for key in ("name", "description", "keywords", "tools", "input", "output", "authors"):
        assert meta.get(key), f"{path}: no {key}"
    assert meta["name"] == module.name and "sclatent" in meta["tools"][0]
    inputs, outputs, topics = declared(module)
    assert [_keys(ch) for ch in meta["input"]] == inputs
    assert set(meta["output"]) == set(outputs), (sorted(meta["output"]), sorted(outputs))
    for emit, names in outputs.items():
        assert [_keys(ch) for ch in meta["output"][emit]] == [names], emit
    assert [_keys(t) for t in meta["topics"]["versions"]] == topics
    for channel in [*meta["input"], *[c for v in meta["output"].values() for c in v]]:
        for element in channel:
            (name, spec), = element.items()
            assert spec.get("type") and spec.get("description"), f"{path}: {name} needs a type and a description"


def test_declarations_are_parsed():
    """The parser itself, on a module with every form: plain inputs, tuples, options, quoted and interpolated names."""
    inputs, outputs, topics = declared(REPO / "modules" / "local" / "check_samplesheet")
    assert inputs == [["samplesheet"], ["base_dir"]] and outputs == {"csv": ["samplesheet.valid.csv"]}
    assert topics == [["${task.process}", "sclatent", 'sclatent --version | sed "s/.* //"']]
    inputs, outputs, _ = declared(REPO / "modules" / "local" / "sample")
    assert inputs == [["meta", "model", "reference", "request", "replicate", "start", "stop"]]
    assert outputs == {"h5ad": ["meta", "generated_r${replicate}_${start}.h5ad"]}
