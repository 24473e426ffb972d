"""examples/quickstart.ipynb runs top to bottom (nbclient) on random:tiny: no cell fails, the
streamed reply reaches the cell's output, and the cache plot is drawn."""

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"
TIMEOUT_S = 180           # per cell; the whole notebook takes about 20 s on an idle 2-core CPU


def tagged(nb, tag):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", ())]
    return cell


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def executed(monkeypatch_module):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel (and the server it starts) inherit this process's environment, with the
    # test session's compilation cache (tests/conftest.py)
    monkeypatch_module.setenv("PENSIEVE_QUICKSTART_MODEL", "random:tiny")
    # plots display inline even where MPLBACKEND names a non-interactive backend (CI)
    monkeypatch_module.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_runs_without_errors(executed):
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count for c in executed.cells if c.cell_type == "code")


@pytest.mark.slow
def test_streams_the_reply_into_the_cell(executed):
    text = stdout(tagged(executed, "stream"))
    streamed, _, summary = text.rpartition("\n[")
    assert streamed, text
    assert summary.rstrip().endswith("]") and " tokens, " in summary, text


@pytest.mark.slow
def test_plots_the_cache_work_per_turn(executed):
    outputs = tagged(executed, "plot").outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs


@pytest.mark.slow    # executes the notebook (~20 s: a server subprocess); .ci/run runs tests/examples
def test_remote_session_and_server_stop(executed):
    text = "".join(stdout(c) for c in executed.cells if c.cell_type == "code")
    assert "pensieve: serving random:tiny on " in text
    assert "server exited with status 0" in text
