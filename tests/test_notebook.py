"""Executes notebooks/quickstart.ipynb top to bottom on CPU, so it cannot rot."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLO_NOTEBOOK_STEPS", "60")
    monkeypatch.setenv("SOLO_NOTEBOOK_WORKDIR", str(tmp_path / "tiny"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "eval loss" in outputs and "[" in outputs  # loss summary and samples were printed
    assert os.path.exists(tmp_path / "tiny" / "metrics.jsonl")
