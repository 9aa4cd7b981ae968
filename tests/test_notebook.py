"""notebooks/quickstart_tpu.ipynb runs headless on CPU, top to bottom, with the tiny organism
and two μKE edits through the Python API, and shows the results table and the pre/post plot.

The kernel gets this session's organism cache (`KEEDIT_CACHE`, the directory the `tiny`
fixture of tests/test_organism_build.py builds into), so the organism is built once per
session whichever test asks first; the statistics and affinities it computes land there too.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from keedit_jax import organism  # noqa: E402 (after the skips)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart_tpu.ipynb"
TABLE_HEADER = "| group | metric | pre | post |"


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The session's KEEDIT_CACHE with the tiny organism built: the same directory as
    test_organism_build.py's `tiny` fixture (ensure_organism's lock and completeness check
    make whichever comes second a no-op)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "keedit-cache"
    cache.mkdir(exist_ok=True)
    organism.ensure_organism("tiny", cache)
    return cache


def with_parameters(notebook, **values):
    """Papermill's convention: a cell after the one tagged `parameters` overrides its values."""
    index = next(i for i, cell in enumerate(notebook.cells)
                 if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)
    return notebook


def outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", [])]


@pytest.mark.slow
def test_quickstart_notebook_runs_headless(organism_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEDIT_CACHE", str(organism_cache))  # the kernel and its children
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device: --mesh_fsdp=-1 is 1
    output_dir = tmp_path / "muke"
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), MODEL="organism:tiny",
                               NUM_EDITS=2, OUTPUT_DIR=str(output_dir), MESH_DATA=1,
                               MESH_FSDP=-1, MESH_TENSOR=1)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()
    finally:  # the executed notebook, for reading a failure
        nbformat.write(notebook, tmp_path / "executed.ipynb")

    shown = outputs(notebook)
    text = "".join(o.get("text", "") for o in shown if o.output_type == "stream")
    assert "processes: 1" in text and "CpuDevice" in text, text[-2000:]
    assert f"checkpoint: {organism_cache}" in text  # the session's organism, not a new one
    assert "mesh: {'data': 1, 'fsdp': 1, 'tensor': 1}" in text and "edited 2/2" in text
    tables = [o.data["text/markdown"] for o in shown
              if o.output_type == "display_data" and "text/markdown" in o.get("data", {})]
    assert any(TABLE_HEADER in table for table in tables), tables
    images = [o for o in shown if "image/png" in o.get("data", {})]
    assert len(images) == 1 and len(images[0].data["image/png"]) > 1000
    assert (output_dir / "pre_post.png").is_file()

    results = json.loads((output_dir / "results.json").read_text())
    assert len(results["case_ids"]) == 2 and not results["failed"]
    assert {row["group"] for row in results["table"]} == {"Ori.", "Para.", "Sub",
                                                             "Sub, unchanged facts"}
    for row in results["table"]:
        assert isinstance(row["post"], int | float) and 0 <= row["post"] <= 100, row
    assert len(results["answers"]["post"]) == len(results["answers"]["pre"]) > 2
