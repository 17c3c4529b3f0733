"""`beit-lightning ARGS` in a process of its own, started in well under a second.

A fresh interpreter spends about 8 s importing torch, Lightning, timm and Hydra before the console
script's ``beit_lightning.cli:main`` runs; tests that start a dozen runs (tests/test_resume.py) pay
that many times. Here a multiprocessing fork server imports ``beit_lightning.cli`` once per pytest
process and forks each run from it: a separate process with its own pid and session (so a test can
SIGKILL the run and its data-loader workers together, as a node failure does), its own environment,
argv and output files, running the console script's function. What differs from exec-ing the script:
the imports are done before the environment is set (the variables read at import time are the fork
server's, the pytest worker's; torch's thread count is set again from the run's OMP_NUM_THREADS), and
every run shares one hash seed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from pathlib import Path

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["beit_lightning.cli"])
    return _CONTEXT


def _run_cli(args: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked process: a session of its own, the environment, argv and output files, then the
    console script's function (its SystemExit becomes the exit code)."""
    os.setsid()
    multiprocessing.set_start_method("fork", force=True)  # the script's default (workers), not the fork server
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):  # read by torch at import, which the fork server did with its own value
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if env.get("PYTHONWARNINGS") == "ignore":  # read by the interpreter at start-up only
        import warnings

        warnings.simplefilter("ignore")
    for fd, path in ((1, stdout), (2, stderr)):
        with open(path, "wb") as f:
            os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["beit-lightning", *args]
    import logging

    from beit_lightning.cli import main

    try:
        main()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()


class CliRun:
    """A started run: ``pid`` (also its process group), ``wait()``, ``kill_group()``, and after
    ``wait()`` its ``returncode``, ``stdout`` and ``stderr`` like ``subprocess.CompletedProcess``."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        count = len(list(folder.glob("cli-*.out")))
        self._out, self._err = folder / f"cli-{count}.out", folder / f"cli-{count}.err"
        self._process = _context().Process(target=_run_cli, args=(list(args), dict(env), str(self._out), str(self._err)))
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> CliRun:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill_group()
            raise TimeoutError(f"beit-lightning (pid {self.pid}) still ran after {timeout} s; killed")
        self.returncode = self._process.exitcode
        return self

    def poll(self) -> int | None:
        return self._process.exitcode

    def kill_group(self) -> None:
        """SIGKILL to the run and the processes it started (its data-loader workers)."""
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.pid, signal.SIGKILL)
        self._process.join()
        self.returncode = self._process.exitcode

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace")
