"""The Colab quickstart runs top to bottom (executed with nbclient, as a user's *Run all* would)."""

from __future__ import annotations

import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "def read_config(path):" in text  # the generation cell printed the prompt and its continuation
    assert "smaller)" in text  # the cache comparison
    loss = [line for line in text.splitlines() if line.startswith("loss ")][0].split()
    assert float(loss[3]) < float(loss[1])  # "loss A -> B": the LoRA fine-tune lowered the loss
    ratio = [line for line in text.splitlines() if "max |jaxmodels - transformers|" in line][0]
    assert float(ratio.split("=")[-1]) < 1e-4  # the export, reloaded by transformers, gives our logits
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))  # the loss plot was drawn
