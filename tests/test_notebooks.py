"""Execute every notebook in ``notebooks/`` with nbclient and fail on the first cell error.

The notebooks hold ``assert`` lines on the facts they illustrate (recipe D2-D7, P3-P8), so a behaviour change
in lit_rlhf breaks this test. The kernel is the ``python3`` kernelspec, which jupyter_client starts with the
interpreter running pytest (the venv's), so the kernel sees the same packages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
# LIT_RLHF_NOTEBOOK_RUN=small: the evaluation notebooks (02, 03) train their small real run (notebooks/_runs.py)
# instead of reading the quickstart's exports, so the test does not depend on (or take the time of) a quickstart
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LIT_RLHF_NOTEBOOK_RUN": "small"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_executes(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )
    try:
        # `env` is handed to the kernel process: offline hub settings whatever the caller's environment.
        client.execute(env={**os.environ, **OFFLINE_ENV})
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)


def test_notebooks_are_stored_without_outputs() -> None:
    """Notebooks are committed clean: no outputs, no execution counts."""
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {index} has stored output"
