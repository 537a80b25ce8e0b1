"""notebooks/quickstart.ipynb runs top to bottom on CPU (headless, nbclient)."""
from __future__ import annotations


import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


def test_quickstart_notebook_executes():
    models = REPO / "models" / "default"
    if not (models / "gpt").is_dir():
        pytest.fail(f"the shipped default model is missing at {models}")
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "second call" in text and "PSNR" in text
    images = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 4
