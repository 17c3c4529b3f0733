import configparser
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_config_folder_ships_in_the_wheel():
    """conf/ is installed as the package beit_lightning.conf; each sub-folder must be listed in
    setup.cfg's packages or an installed beit-lightning would miss that config group."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = set(cfg["options"]["packages"].split())
    folders = {
        "beit_lightning.conf" + "".join(f".{part}" for part in p.relative_to(ROOT / "conf").parts)
        for p in [ROOT / "conf", *(d for d in (ROOT / "conf").rglob("*") if d.is_dir() and d.name != "__pycache__")]
    }
    assert folders <= packages, f"add to setup.cfg [options] packages: {sorted(folders - packages)}"


def test_pyproject_holds_no_project_table():
    """setuptools ignores setup.cfg's metadata when pyproject.toml has a [project] table."""
    assert "[project]" not in (ROOT / "pyproject.toml").read_text()
