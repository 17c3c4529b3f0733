"""The progress bar refreshes every 20 steps (it reads the logged values, a host-device
synchronisation, only when it refreshes), and is left out when the trainer's bar is off."""

from __future__ import annotations

import contextlib

from hydra import compose, initialize_config_module
from pytorch_lightning.callbacks import TQDMProgressBar

from beit_lightning import cli


def _trainer_callbacks(tmp_path, bar: bool, monkeypatch) -> list:
    seen = {}

    def fake_fit(self, *args, **kwargs):  # stop after the Trainer is built: its callbacks are what we check
        seen["callbacks"] = list(self.callbacks)
        raise SystemExit(0)

    monkeypatch.setattr("pytorch_lightning.Trainer.fit", fake_fit)
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=smoke", f"output_dir={tmp_path}", "data.num_train=16", "data.num_val=0",
            f"trainer.enable_progress_bar={str(bar).lower()}", "logger=csv"])
    with contextlib.suppress(SystemExit):
        cli.train(cfg)
    return seen["callbacks"]


def test_bar_refresh_rate_and_bar_off(tmp_path, monkeypatch):
    bars = [c for c in _trainer_callbacks(tmp_path / "on", True, monkeypatch) if isinstance(c, TQDMProgressBar)]
    assert len(bars) == 1 and bars[0].refresh_rate == 20
    off = _trainer_callbacks(tmp_path / "off", False, monkeypatch)
    assert not [c for c in off if isinstance(c, TQDMProgressBar)]
