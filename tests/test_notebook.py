"""notebooks/quickstart.ipynb runs top to bottom on CPU, as a user runs it."""
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_committed_notebook_is_valid_and_has_no_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source


def _outputs(cell, kind):
  return [o for o in cell.outputs if kind in o.get("data", {})]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  """Every cell runs without error (nbclient raises on the first failing
  cell) and shows what its markdown promises."""
  # The kernel inherits this environment: one CPU device as on a laptop or
  # Colab (not the 8 fake devices of the sharding tests), and its
  # temporary workdir and data under this test's directory.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()

  code = [c for c in notebook.cells if c.cell_type == "code"]
  text = lambda cell: "".join(o.get("text", "") for o in cell.outputs)
  train, table, usage, predict = code[1:]
  assert "Evaluation of the validation split at step" in text(train)
  (html,) = _outputs(table, "text/html")
  assert html["data"]["text/html"].count("<tr>") == 7  # Header + six tasks.
  assert _outputs(usage, "image/png")
  assert os.path.exists(next(tmp_path.glob("omnismola_quickstart_*/run/"
                                           "analysis/usage.json")))
  assert _outputs(predict, "image/png")
  assert text(predict).count(" -> ") == 3
