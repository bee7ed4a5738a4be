"""Executes the notebooks top to bottom on CPU (at a reduced size), so they cannot rot."""

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    """One XLA compilation cache for the notebooks' kernels: their sweep points compile the
    same programs again (same shapes), which then load instead."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def execute(name: str, tmp_path: Path, monkeypatch, cache: str = "", **env: str) -> str:
    """Runs notebooks/<name> with `env` set; returns the text of every output."""
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    outputs = execute("quickstart.ipynb", tmp_path, monkeypatch, SOLO_NOTEBOOK_STEPS="60",
                      SOLO_NOTEBOOK_WORKDIR=str(tmp_path / "tiny"))
    assert "eval loss" in outputs and "[" in outputs  # loss summary and samples were printed
    assert os.path.exists(tmp_path / "tiny" / "metrics.jsonl")


@pytest.mark.slow
def test_knowledge_notebook_runs(tmp_path, monkeypatch, compile_cache):
    root = tmp_path / "k"
    outputs = execute("knowledge.ipynb", tmp_path, monkeypatch, compile_cache,
                      SOLO_NOTEBOOK_SIZE="ci", SOLO_NOTEBOOK_WORKDIR=str(root))
    results = json.loads((root / "results.json").read_text())["results"]
    # 1 bio vs 5 paraphrases, each pretrained, fine-tuned and asked (6 questions per split)
    assert len(results) == 2 and all(r["test_n"] == r["train_n"] == 6 for r in results.values())
    for name in results:
        assert (root / "qa" / name / "checkpoints").is_dir()
        cfg = json.loads((root / "qa" / name / "config.json").read_text())
        assert cfg["train"]["init_from"].endswith(f"pretrain/{name}")
    assert "held-out QA" in outputs and "5 shuffled paraphrases, full names" in outputs


@pytest.mark.slow
def test_ablations_notebook_runs(tmp_path, monkeypatch, compile_cache):
    root = tmp_path / "a"
    outputs = execute("ablations.ipynb", tmp_path, monkeypatch, compile_cache,
                      SOLO_NOTEBOOK_SIZE="ci", SOLO_NOTEBOOK_WORKDIR=str(root))
    for point in ("model.num_kv_heads/model.num_kv_heads=1",
                  "objectives.nsp.weight/objectives.nsp.weight=0.1"):
        assert (root / point / "metrics.jsonl").exists()
    assert "model.num_kv_heads=1" in outputs and "eval/loss" in outputs  # the summary tables


def test_every_notebook_installs_solo_the_same_way_and_has_a_colab_badge():
    """The first code cell is the Colab install cell, identical everywhere; a badge links the
    notebook itself."""
    firsts = {}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        firsts[path.name] = next(c.source for c in nb.cells if c.cell_type == "code")
        badge = "colab.research.google.com/github/" in "".join(
            c.source for c in nb.cells if c.cell_type == "markdown")
        assert badge and f"notebooks/{path.name})" in "".join(c.source for c in nb.cells), path
    assert len(firsts) == 3 and len(set(firsts.values())) == 1
    cell = next(iter(firsts.values()))
    assert "'google.colab' in sys.modules" in cell and "'--no-deps'" in cell
