"""The notebooks run: each is executed again from its committed cells, on fewer images and steps (a
cell that raises fails the suite), and the committed copy carries its outputs, so it reads on GitHub
as it runs."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
# What test_notebook_executes runs each notebook with: the same cells on fewer images and steps (the
# committed outputs, checked by test_every_notebook_is_built_and_committed_executed, are the full
# runs). Each text must occur in the notebook's code exactly `count` times, so a changed notebook
# fails here and this table is updated with it.
SMALLER = {
    "quickstart": [("num_train=256", "num_train=64", 1), ("max_epochs=3", "max_epochs=2", 1)],
    "visualise": [("num_train=2048", "num_train=256", 1), ("max_steps=200", "max_steps=20", 1),
                  ("tau_anneal_steps=200", "tau_anneal_steps=20", 1), ("kl_warmup_steps=60", "kl_warmup_steps=6", 1),
                  ("warmup_steps=20", "warmup_steps=2", 1), ("num_train=1024", "num_train=128", 2),
                  ("max_epochs=4", "max_epochs=1", 1), ("max_epochs=3", "max_epochs=1", 1),
                  ("num_val=256", "num_val=64", 1)],
    "segmentation": [("num_train=512", "num_train=64", 1), ("max_epochs=10", "max_epochs=1", 1),
                     ("num_val=32", "num_val=8", 1)],
}


def _smaller(nb, name: str) -> None:
    """The notebook's code cells with SMALLER's sizes, in place."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    for old, new, count in SMALLER[name]:
        found = sum(c.source.count(old) for c in code)
        assert found == count, (f"{name}.ipynb has {old!r} {found} times, SMALLER in tests/test_notebooks.py expects "
                                f"{count}: update the table with the notebook")
        for c in code:
            c.source = c.source.replace(old, new)


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
    _smaller(nb, name)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 1, f"{name} drew no picture"
