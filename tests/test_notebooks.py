"""The notebooks run: each is executed again from its committed cells (a cell that raises fails the
suite), and the committed copy carries its outputs, so it reads on GitHub as it runs."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_is_built_and_committed_executed():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("build", NOTEBOOKS / "build.py")
    build = module_from_spec(spec)
    spec.loader.exec_module(build)
    assert NAMES == sorted(build.NOTEBOOKS) == ["quickstart", "segmentation", "visualise"]
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.source for c in code] == [src for kind, src in build.NOTEBOOKS[name] if kind == "code"], (
            f"{name}.ipynb differs from notebooks/build.py: run python notebooks/build.py {name}")
        assert all(c.execution_count for c in code), f"{name}.ipynb is committed unexecuted"
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs), f"{name}.ipynb holds an error"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path):
    # run in a copy of the folder layout, so the notebook's relative paths (outputs/, ../tests) hold
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", work)
    (tmp_path / "tests").symlink_to(Path(__file__).parent)
    nb = nbformat.read(work / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 1, f"{name} drew no picture"
