"""A callback for subprocess tests: the process sends itself a real signal at a chosen step (as
SLURM sends SIGUSR1 before a time limit or a pre-emption). Importable by the CLI through
``+callbacks.signal._target_=signal_at_step.SignalAtStep`` with ``tests/`` on PYTHONPATH."""

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, signum: str = "SIGUSR1") -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signum))
