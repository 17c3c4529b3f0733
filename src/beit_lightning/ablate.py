"""``beit-lightning-ablate``: the BEiT paper's ablation table (Table 4) on your own data.

Does BEiT pre-training help on *this* data, and which part of it? For each variant of the
pre-training task (blockwise or random masking, visual tokens or pixels as targets, the loss on
the masked patches or on all of them) and each seed it runs, with the project's own Hydra
experiments:

1. a dVAE tokenizer trained on the same images (once; or a given tokenizer),
2. pre-training of the chosen model size,
3. fine-tuning and a linear probe on the labelled split, from that checkpoint,
4. the same fine-tuning and probe from random initialisation (``scratch``),

then writes one table (mean +- std over seeds; Markdown and CSV), a plot, and which of the
paper's orderings hold with a margin larger than the seed spread. Every run has its own folder
under ``--out``; a run counts as finished when its result file exists (written after training
ended), so running the same command again after a kill continues where it stopped (an
unfinished run resumes from its newest checkpoint).

    beit-lightning-ablate --out outputs/ablate                     # micro BEiT, generated data, CPU
    beit-lightning-ablate --out outputs/ablate_photos --seeds 2 data=imagefolder data.root=/data/photos
    beit-lightning-ablate --scale base --out /ckpt/ablate --launcher slurm \\
        --launcher-override hydra.launcher.partition=gpu data=imagefolder data.root=/data/imagenet

Trailing ``key=value`` arguments are Hydra overrides given to every run (data group and folder,
``model=...``, ``trainer=...``). ``--launcher slurm`` (or any other ``hydra/launcher``) starts each
run as ``beit-lightning -m hydra/launcher=...`` (one job per run, the runs of a stage at the same
time) instead of in this process.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["VARIANTS", "SCALES", "Variant", "Run", "Ordering", "plan", "run_all", "summarise", "orderings", "main"]

RESULT_FILE = "ablate_result.json"


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: how pre-training differs from BEiT (``masking`` is ``None`` for no pre-training)."""

    name: str
    paper_row: str
    masking: str | None = None
    target: str | None = None
    loss_on: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.masking is not None


#: the variants, in the order of Table 4 of the BEiT paper (arXiv 2106.08254), and the baseline
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("beit", "BEiT", "blockwise", "tokens", "masked"),
    Variant("no_blockwise", "- Blockwise masking", "random", "tokens", "masked"),
    Variant("pixels", "- Visual tokens (recover masked pixels)", "blockwise", "pixels", "masked"),
    Variant("pixels_no_blockwise", "- Visual tokens - Blockwise masking", "random", "pixels", "masked"),
    Variant("all_tokens", "+ Recover 100% visual tokens", "blockwise", "tokens", "all"),
    Variant("scratch", "random initialisation (no pre-training)"),
)}


@dataclass(frozen=True)
class Scale:
    """The experiments of each stage and the default epoch budgets (``None``: the experiment's own)."""

    tokenizer: str
    pretrain: str
    finetune: str
    probe: str
    tokenizer_epochs: int | None
    pretrain_epochs: int | None
    finetune_epochs: int | None
    probe_epochs: int | None
    #: validate only at the end of a run (cheap micro runs) rather than as the experiment says
    validate_at_end_only: bool
    #: overrides for the embedded generated data (its size), unless the command line sets them
    generated_data: tuple[str, ...] = ()


SCALES: dict[str, Scale] = {
    # micro BEiT (64-d, 2 blocks, 8px patches, 64px images) on CPU: the whole default ablation in minutes
    # (on the generated data: 128 training images, 4 steps of 32 an epoch; 256 validation images)
    "micro": Scale("smoke_tokenizer", "smoke", "smoke_finetune", "smoke_linear_probe", 5, 5, 5, 5, True,
                   ("data.num_train=128", "data.num_val=256")),
    # BEiT-B/16 with the paper's recipes; 300 pre-training epochs as the paper's ablations
    "base": Scale("dvae_imagenet", "beit_base_pretrain", "beit_base_finetune_in1k", "beit_base_linear_probe_in1k",
                  None, 300, None, None, False),
}


@dataclass
class Run:
    """One training run: its stage, variant and seed, its folder, and the Hydra overrides that make it."""

    stage: str  # tokenizer | pretrain | finetune | probe
    variant: str
    seed: int
    folder: str
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.variant}/seed{self.seed}" if self.stage != "tokenizer" else "tokenizer"

    @property
    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.folder, RESULT_FILE))


# --- planning ---------------------------------------------------------------------------------
def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _has(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _split_folder(root: str, train_dir: str, val_dir: str | None, out: str, val_fraction: float = 0.2) -> str | None:
    """A photo folder without a validation split: make one (``<out>/data/{train,val}/<class>/``, links,
    a fixed fifth of each class for validation) and return its root; ``None`` when the folder has both."""
    train = os.path.join(root, train_dir)
    has_val = bool(val_dir) and os.path.isdir(os.path.join(root, val_dir))
    source = train if os.path.isdir(train) else root
    if os.path.isdir(train) and has_val:
        return None
    from .data.shards import list_images

    files, classes = list_images(source, None)
    if not classes:
        raise ValueError(f"{source!r} has no class sub-folders: fine-tuning and the linear probe need labelled "
                         "images, <root>/<class>/*.jpg or <root>/train/<class>/ and <root>/val/<class>/")
    split = os.path.join(out, "data")
    done = os.path.join(split, ".complete")
    if os.path.isfile(done):
        return split
    sizes = {name: sum(1 for _, c in files if c == label) for label, name in enumerate(classes)}
    small = [name for name, size in sizes.items() if size < 2]
    if small:
        raise ValueError(f"classes {small} of {source!r} have fewer than 2 images: a validation split needs at least "
                         "one image of every class left over for training; add images or remove those classes")
    rng = random.Random(0)
    for label, name in enumerate(classes):
        members = sorted(p for p, c in files if c == label)
        rng.shuffle(members)
        n_val = max(1, round(len(members) * val_fraction))
        for i, path in enumerate(members):
            folder = os.path.join(split, "val" if i < n_val else "train", name)
            os.makedirs(folder, exist_ok=True)
            link = os.path.join(folder, f"{i:06d}_{os.path.basename(path)}")
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(path), link)
    with open(done, "w") as f:
        f.write(f"split of {source}: {val_fraction:.0%} of each class for validation (seed 0)\n")
    return split


@dataclass
class Setup:
    """What the plan needs to know about the data and the model (read from the composed configs)."""

    data_overrides: list[str]
    num_classes: int | None
    grid: int
    patch_size: int
    tokenizer_size: int
    notes: list[str]
    generated: bool = False
    #: training images (a photo folder), to keep every batch size below it; ``None``: not counted
    num_train: int | None = None


def inspect_setup(scale: Scale, overrides: Sequence[str], out: str) -> Setup:
    """Compose the pre-training and fine-tuning configs with the user's overrides: the patch grid
    (the tokenizer's view), the number of classes, and a validation split for a photo folder without one."""
    from .models.tokenizers.dvae import DiscreteVAE

    cfg = _compose([f"experiment={scale.pretrain}", "output_dir=.", *overrides])
    patch, img = int(cfg.model.patch_size), int(cfg.model.img_size)
    grid = img // patch
    notes, data_overrides = [], []
    data = cfg.data
    num_classes = num_train = None
    if str(data.get("_target_", "")).endswith("ImageFolderDataModule"):
        root = data.get("root")
        if root in (None, "???") or not os.path.isdir(str(root)):
            raise FileNotFoundError(f"data.root={root!r} is not a folder: give data=imagefolder data.root=<your photos>")
        split = _split_folder(str(root), str(data.train_dir), data.get("val_dir"), out)
        source = str(root)
        if split is not None:
            data_overrides = [f"data.root={split}", "data.train_dir=train", "data.val_dir=val"]
            notes.append(f"{root} has no train/val split: made one under {split} (20% of each class for validation)")
            source = split
        from .data.shards import list_images

        files, classes = list_images(os.path.join(source, "train" if split else str(data.train_dir)), None)
        num_classes, num_train = len(classes), len(files)
    elif "num_classes" in data:
        num_classes = int(data.num_classes)
    generated = str(data.get("_target_", "")).endswith("GeneratedDataModule")
    return Setup(data_overrides, num_classes, grid, patch, grid * DiscreteVAE.downsample, notes, generated, num_train)


def _fitting_batch(experiment: str, overrides: Sequence[str], setup: Setup) -> list[str]:
    """A smaller batch for a stage whose batch is larger than a small photo folder (the training loaders
    drop the last incomplete batch, so a run would have no batch at all): the largest power of two that fits."""
    if setup.num_train is None or _has(overrides, "data.batch_size"):
        return []
    batch = int(_compose([f"experiment={experiment}", "output_dir=.", *overrides]).data.batch_size)
    if batch <= setup.num_train:
        return []
    fitting = 2 ** int(math.log2(setup.num_train))
    setup.notes.append(f"{experiment}: {setup.num_train} training images, fewer than its batch of {batch}: "
                       f"data.batch_size={fitting}")
    return [f"data.batch_size={fitting}"]


def _tokenizer_overrides(tokenizer: str, out: str, setup: Setup, scale: Scale, overrides: Sequence[str]) -> list[str]:
    """The pre-training overrides that select the tokenizer: one this command trains, or a given one."""
    size = setup.tokenizer_size
    if tokenizer == "train":
        vocab = int(_compose([f"experiment={scale.tokenizer}", "output_dir=.", *overrides]).task.tokenizer.vocab_size)
        path = os.path.join(out, "tokenizer", "tokenizer.pt")
        return ["tokenizer=dvae", f"tokenizer.checkpoint={path}", f"tokenizer.vocab_size={vocab}",
                f"tokenizer.image_size={size}", f"data.tokenizer_size={size}"]
    if tokenizer == "dall_e" or tokenizer.endswith(".pkl"):
        path = "dall_e_encoder" if tokenizer == "dall_e" else os.path.abspath(tokenizer)
        return ["tokenizer=dall_e", f"tokenizer.path={path}", f"tokenizer.image_size={size}", f"data.tokenizer_size={size}"]
    import torch

    saved = torch.load(tokenizer, map_location="cpu", weights_only=True)
    config = saved.get("config", {}) if isinstance(saved, dict) else {}
    if "vocab_size" not in config:
        raise ValueError(f"{tokenizer!r} is not a beit-lightning tokenizer file (tokenizer.pt of task=tokenizer), "
                         "nor OpenAI's encoder.pkl: give one of those, 'dall_e', or 'train'")
    image_size = int(config.get("image_size", size))
    return ["tokenizer=dvae", f"tokenizer.checkpoint={os.path.abspath(tokenizer)}",
            f"tokenizer.vocab_size={int(config['vocab_size'])}", f"tokenizer.image_size={image_size}",
            f"data.tokenizer_size={image_size}"]


def _budget(epochs: int | None, scale: Scale) -> list[str]:
    if epochs is None:
        return []
    budget = [f"trainer.max_epochs={epochs}", "trainer.max_steps=-1"]
    if scale.validate_at_end_only:  # one validation, at the end; one epoch checkpoint (plus last.ckpt)
        budget += [f"trainer.check_val_every_n_epoch={epochs}", "trainer.val_check_interval=null",
                   f"callbacks.checkpoint.every_n_epochs={epochs}"]
    return budget


def plan(
    out: str,
    scale: Scale,
    variants: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    tokenizer: str = "train",
    pixel_norm: bool = False,
    epochs: dict[str, int | None] | None = None,
) -> tuple[list[Run], Setup]:
    """Every run of the ablation, in an order that respects their dependencies (tokenizer, then
    pre-training, then fine-tuning and probing)."""
    out = os.path.abspath(out)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    epochs = {"tokenizer": scale.tokenizer_epochs, "pretrain": scale.pretrain_epochs, "finetune": scale.finetune_epochs,
              "probe": scale.probe_epochs, **(epochs or {})}
    setup = inspect_setup(scale, overrides, out)
    sized = [o for o in scale.generated_data if setup.generated and not _has(overrides, o.split("=", 1)[0])]
    user = [*sized, *overrides, *setup.data_overrides]
    # a CSV log to read the results from; no pictures, no per-run summary table, no progress bars
    common = ["logger=csv", "~callbacks.validation_images", "callbacks.model_summary.max_depth=0",
              "trainer.enable_progress_bar=false", "ckpt_path=last"]
    runs: list[Run] = []
    chosen = [VARIANTS[v] for v in variants]
    needs_tokens = any(v.target == "tokens" for v in chosen)
    tok = []
    if needs_tokens:
        if tokenizer == "train":
            runs.append(Run("tokenizer", "dvae", seeds[0], os.path.join(out, "tokenizer"),
                            [f"experiment={scale.tokenizer}", *common, *_budget(epochs["tokenizer"], scale),
                             f"seed={seeds[0]}", *user, *_fitting_batch(scale.tokenizer, user, setup),
                             f"data.tokenizer_size={setup.tokenizer_size}"]))
        tok = _tokenizer_overrides(tokenizer, out, setup, scale, overrides)
    fitting = {e: _fitting_batch(e, user, setup) for e in (scale.pretrain, scale.finetune, scale.probe)}
    for variant in (v for v in chosen if v.pretrained):
        for seed in seeds:
            task = [f"data.masking={variant.masking}", f"task.target={variant.target}", f"task.loss_on={variant.loss_on}"]
            if variant.target == "pixels":  # a linear head of patch*patch*3 outputs; no tokenizer
                task += ["task.tokenizer=null", f"task.model.vocab_size={setup.patch_size**2 * 3}",
                         f"task.pixel_norm={str(pixel_norm).lower()}", "tokenizer=dall_e_untrained",
                         f"data.tokenizer_size={setup.tokenizer_size}"]
            else:
                task += tok
            runs.append(Run("pretrain", variant.name, seed, os.path.join(out, "pretrain", variant.name, f"seed{seed}"),
                            [f"experiment={scale.pretrain}", *common, *_budget(epochs["pretrain"], scale),
                             f"seed={seed}", *user, *fitting[scale.pretrain], *task]))
    classes = [] if setup.num_classes is None or _has(overrides, "task.num_classes") else [f"task.num_classes={setup.num_classes}"]
    for stage, experiment in (("finetune", scale.finetune), ("probe", scale.probe)):
        for variant in chosen:
            for seed in seeds:
                init = []
                if variant.pretrained:
                    init = [f"init_checkpoint={os.path.join(out, 'pretrain', variant.name, f'seed{seed}', 'checkpoints', 'last.ckpt')}"]
                runs.append(Run(stage, variant.name, seed, os.path.join(out, stage, variant.name, f"seed{seed}"),
                                [f"experiment={experiment}", *common, *_budget(epochs[stage], scale), f"seed={seed}",
                                 *user, *fitting[experiment], *classes, *init]))
    return runs, setup


# --- running -------------------------------------------------------------------------------------
def last_values(metrics_csv: str, keys: Sequence[str]) -> dict[str, float]:
    """The last logged value of each of ``keys`` in a CSVLogger ``metrics.csv`` (missing keys are left out)."""
    values: dict[str, float] = {}
    if not os.path.isfile(metrics_csv):
        return values
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key in keys:
                if row.get(key) not in (None, ""):
                    values[key] = float(row[key])
    return values


METRICS = {"pretrain": ("val/loss", "val/mlm_acc"), "finetune": ("val/acc1",), "probe": ("val/acc1", "val/best_block")}


def record_result(run: Run, seconds: float) -> dict:
    """Check what a run left behind and write its result file (which marks it finished)."""
    if run.stage == "tokenizer":
        if not os.path.isfile(os.path.join(run.folder, "tokenizer.pt")):
            raise RuntimeError(f"the tokenizer run in {run.folder} ended without writing tokenizer.pt")
        metrics = last_values(os.path.join(run.folder, "csv", "metrics.csv"), ("val/loss", "val/perplexity"))
    else:
        metrics = last_values(os.path.join(run.folder, "csv", "metrics.csv"), METRICS[run.stage])
        if METRICS[run.stage][0] not in metrics:
            raise RuntimeError(
                f"{run.name} logged no {METRICS[run.stage][0]} (in {run.folder}/csv/metrics.csv): the ablation needs a "
                "validation split (data.val_dir / data.num_val) and a validation at the end of training"
            )
        if run.stage == "pretrain" and not os.path.isfile(os.path.join(run.folder, "checkpoints", "last.ckpt")):
            raise RuntimeError(f"{run.name} left no checkpoints/last.ckpt for fine-tuning")
    result = {"stage": run.stage, "variant": run.variant, "seed": run.seed, "metrics": metrics,
              "seconds": round(seconds, 1), "overrides": run.overrides}
    with open(os.path.join(run.folder, RESULT_FILE + ".tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(run.folder, RESULT_FILE + ".tmp"), os.path.join(run.folder, RESULT_FILE))
    return result


def train_in_process(run: Run) -> None:
    """Compose the run's config and call :func:`beit_lightning.cli.train`, as ``beit-lightning`` would."""
    import gc

    from .cli import train

    train(_compose([*run.overrides, f"output_dir={run.folder}"]))
    gc.collect()  # the run's trainer, data loader workers and model go before the next run starts


def launcher_command(run: Run, launcher: str, launcher_overrides: Sequence[str] = ()) -> list[str]:
    """``beit-lightning -m`` with a Hydra launcher (``slurm``: submitit) for one run, in its folder."""
    return [sys.executable, "-m", "beit_lightning", "-m", f"hydra/launcher={launcher}", *launcher_overrides,
            *run.overrides, f"output_dir={run.folder}", f"hydra.sweep.dir={run.folder}", "hydra.sweep.subdir=."]


def run_all(
    runs: Sequence[Run],
    launcher: str = "inprocess",
    launcher_overrides: Sequence[str] = (),
    parallel: int = 0,
    execute: Callable[[Run], None] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Run every unfinished run, stage by stage; return how many were executed (finished ones are skipped).

    ``launcher="inprocess"`` trains here, one run after the other; any other value is a Hydra launcher
    (``slurm``, ``basic``) and each run of a stage becomes one ``beit-lightning -m`` command, ``parallel``
    at a time (0: all)."""
    executed = 0
    todo = [r for r in runs if not r.finished]
    if len(todo) < len(runs):
        log(f"{len(runs) - len(todo)} of {len(runs)} runs already finished: skipped")
    for stage in ("tokenizer", "pretrain", "finetune", "probe"):
        batch = [r for r in todo if r.stage == stage]
        if not batch:
            continue

        def one(run: Run, number: int) -> None:
            os.makedirs(run.folder, exist_ok=True)
            log(f"[{number}/{len(todo)}] {run.name}: starting in {run.folder}")
            start = time.time()
            if execute is not None:
                execute(run)
            elif launcher == "inprocess":
                train_in_process(run)
            else:
                command = launcher_command(run, launcher, launcher_overrides)
                with open(os.path.join(run.folder, "launcher.log"), "a") as out:
                    code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
                if code != 0:
                    raise RuntimeError(f"{run.name} failed (exit {code}): see {run.folder}/launcher.log\n  "
                                       + shlex.join(command))
            record_result(run, time.time() - start)
            log(f"[{number}/{len(todo)}] {run.name}: finished in {time.time() - start:.0f} s")

        numbered = [(r, executed + i + 1) for i, r in enumerate(batch)]
        if launcher == "inprocess" or execute is not None:
            for run, number in numbered:
                one(run, number)
        else:
            with ThreadPoolExecutor(max_workers=parallel or len(batch)) as pool:
                for future in [pool.submit(one, r, n) for r, n in numbered]:
                    future.result()
        executed += len(batch)
    return executed


# --- the summary ---------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


#: table columns: (key, stage, metric in metrics.csv, heading, scale for display)
COLUMNS = (
    ("finetune_top1", "finetune", "val/acc1", "fine-tune top-1 (%)", 100.0),
    ("probe_top1", "probe", "val/acc1", "linear probe top-1 (%)", 100.0),
    ("pretrain_val_loss", "pretrain", "val/loss", "pre-training val loss", 1.0),
    ("pretrain_token_acc", "pretrain", "val/mlm_acc", "pre-training token acc. (%)", 100.0),
)


def collect(runs: Sequence[Run]) -> dict[str, dict[str, list[float]]]:
    """{variant: {column: [value per seed]}} from the result files of the finished runs."""
    table: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if run.stage == "tokenizer" or not run.finished:
            continue
        with open(os.path.join(run.folder, RESULT_FILE)) as f:
            metrics = json.load(f)["metrics"]
        row = table.setdefault(run.variant, {key: [] for key, *_ in COLUMNS})
        for key, stage, metric, _, _ in COLUMNS:
            if stage == run.stage and metric in metrics:
                row[key].append(metrics[metric])
    return table


@dataclass(frozen=True)
class Ordering:
    """One of the paper's orderings, tested on one metric: ``better`` vs ``worse``."""

    claim: str
    better: str
    worse: str
    metric: str
    margin: float  # mean(better) - mean(worse), in the column's display unit
    spread: float  # the larger seed standard deviation of the two (nan: fewer than 2 seeds)

    @property
    def verdict(self) -> str:
        if math.isnan(self.margin):
            return "not measured"
        if math.isnan(self.spread):
            return "unresolved: one seed has no spread"
        if self.margin > self.spread:
            return "holds (margin > seed spread)"
        if -self.margin > self.spread:
            return "reversed (margin > seed spread, the other way)"
        return "unresolved (within the seed spread)"

    @property
    def holds(self) -> bool:
        return self.verdict.startswith("holds")


#: the paper's orderings: (claim, better variant, worse variant)
PAPER_ORDERINGS = (
    ("BEiT > scratch", "beit", "scratch"),
    ("tokens > pixels", "beit", "pixels"),
    ("tokens > pixels (random masking)", "no_blockwise", "pixels_no_blockwise"),
    ("blockwise >= random", "beit", "no_blockwise"),
    ("blockwise >= random (pixels)", "pixels", "pixels_no_blockwise"),
    ("masked > all patches", "beit", "all_tokens"),
)


def orderings(table: dict[str, dict[str, list[float]]]) -> list[Ordering]:
    """Each of the paper's orderings whose two variants were run, on fine-tune and on probe top-1."""
    found = []
    for claim, better, worse in PAPER_ORDERINGS:
        if better not in table or worse not in table:
            continue
        for key, _, _, heading, unit in COLUMNS[:2]:
            (mb, sb, _), (mw, sw, _) = _mean_std(table[better][key]), _mean_std(table[worse][key])
            spread = math.nan if math.isnan(sb) or math.isnan(sw) else max(sb, sw) * unit
            found.append(Ordering(claim, better, worse, heading, (mb - mw) * unit, spread))
    return found


def _cell(values: Sequence[float], unit: float, digits: int) -> str:
    mean, std, n = _mean_std(values)
    if n == 0:
        return "n/a"
    return f"{mean * unit:.{digits}f}" + (f" ± {std * unit:.{digits}f}" if n > 1 else "")


def summarise(out: str, runs: Sequence[Run], title: str, notes: Sequence[str] = (), plot: bool = True) -> str:
    """Write ``ablation.md``, ``ablation.csv``, ``runs.csv`` and ``ablation.png`` under ``out``; return the Markdown."""
    table = collect(runs)
    variants = [v for v in VARIANTS if v in table]
    seeds = sorted({r.seed for r in runs if r.stage != "tokenizer"})
    lines = [f"# {title}", "", f"Mean ± standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
             "fine-tune and probe top-1 on the validation split at the end of training. Pre-training val loss is "
             "cross-entropy for token targets and mean squared error for pixel targets (not comparable); token "
             "accuracy is at the masked patches.", "",
             "| variant | BEiT paper, Table 4 | masking | target | loss on | "
             + " | ".join(heading for _, _, _, heading, _ in COLUMNS) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    for name in variants:
        v, row = VARIANTS[name], table[name]
        cells = [_cell(row[key], unit, 3 if unit == 1.0 else 1) for key, _, _, _, unit in COLUMNS]
        lines.append(f"| {name} | {v.paper_row} | {v.masking or '-'} | {v.target or '-'} | {v.loss_on or '-'} | "
                     + " | ".join(cells) + " |")
    found = orderings(table)
    lines += ["", "Orderings of the paper (margin = difference of the means in points; spread = the larger seed "
              "standard deviation of the two):", ""]
    lines += [f"- {o.claim} on {o.metric}: {o.better} vs {o.worse}, margin {o.margin:+.1f}, spread "
              f"{'n/a' if math.isnan(o.spread) else f'{o.spread:.1f}'}: **{o.verdict}**" for o in found]
    if not found:
        lines.append("- none measured: no ordering has both of its variants in this run")
    held = [f"{o.claim} ({o.metric})" for o in found if o.holds]
    lines += ["", "Holding with a margin larger than the seed spread: " + ("; ".join(held) if held else "none") + "."]
    pending = [r.name for r in runs if not r.finished]
    if pending:
        lines += ["", f"Unfinished: {len(pending)} of {len(runs)} runs ({', '.join(pending[:4])}"
                  f"{', ...' if len(pending) > 4 else ''}); the table covers the finished ones only."]
    if notes:
        lines += ["", *[f"Note: {n}" for n in notes]]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "ablation.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "masking", "target", "loss_on", "seeds",
                         *[f"{key}_{s}" for key, *_ in COLUMNS for s in ("mean", "std")]])
        for name in variants:
            v = VARIANTS[name]
            stats = [x for key, *_ in COLUMNS for x in _mean_std(table[name][key])[:2]]
            writer.writerow([name, v.masking or "", v.target or "", v.loss_on or "",
                             max(len(table[name][key]) for key, *_ in COLUMNS), *[f"{x:.6g}" for x in stats]])
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stage", "variant", "seed", "metric", "value", "seconds", "folder"])
        for run in runs:
            if run.finished:
                with open(os.path.join(run.folder, RESULT_FILE)) as g:
                    result = json.load(g)
                for metric, value in result["metrics"].items():
                    writer.writerow([run.stage, run.variant, run.seed, metric, value, result["seconds"], run.folder])
    if plot:
        plot_table(table, variants, os.path.join(out, "ablation.png"), title)
    return text


def plot_table(table: dict[str, dict[str, list[float]]], variants: Sequence[str], path: str, title: str) -> bool:
    """Bars of fine-tune and probe top-1 per variant (mean), the seed spread as error bars and each seed
    as a dot; ``False`` (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(variants) + 2), 4.8))
    width = 0.38
    for i, (key, _, _, heading, unit) in enumerate(COLUMNS[:2]):
        xs = [j + (i - 0.5) * width for j in range(len(variants))]
        stats = [_mean_std(table[v][key]) for v in variants]
        means = [s[0] * unit for s in stats]
        stds = [0.0 if math.isnan(s[1]) else s[1] * unit for s in stats]
        ax.bar(xs, means, width, yerr=stds, capsize=4, label=heading.replace(" (%)", ""), color=f"C{i}", alpha=0.85)
        for x, v in zip(xs, variants, strict=True):
            points = [p * unit for p in table[v][key]]
            ax.plot([x] * len(points), points, "o", color="black", markersize=3.5, zorder=3)
    ax.plot([], [], "o", color="black", markersize=3.5, label="one seed")
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([v.replace("_", "\n") for v in variants])
    ax.set_xlabel("pre-training variant")
    ax.set_ylabel("top-1 accuracy on the validation split (%)")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.legend(loc="best", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- the command -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="beit-lightning-ablate",
        description="The BEiT paper's ablations (Table 4) on your data: pre-training variants x seeds, then fine-tuning "
                    "and a linear probe of each, and the same from random initialisation; one table, a plot, and "
                    "which orderings hold beyond the seed spread. Trailing key=value arguments are Hydra overrides "
                    "for every run (e.g. data=imagefolder data.root=/data/photos model=beit_small).",
    )
    parser.add_argument("--out", required=True, help="folder of the runs and the summary (re-run to continue)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="micro",
                        help="micro: the smoke experiments (micro BEiT, CPU); base: the BEiT-B/16 recipes")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--tokenizer", default="train",
                        help="'train' (a dVAE on the same data first, default), 'dall_e' (OpenAI's encoder), "
                             "an encoder.pkl, or a tokenizer.pt of task=tokenizer")
    parser.add_argument("--pixel-norm", action="store_true",
                        help="pixel targets normalised per patch (MAE) instead of plain pixels (the paper's ablation)")
    for stage in ("tokenizer", "pretrain", "finetune", "probe"):
        parser.add_argument(f"--{stage}-epochs", type=int, default=None,
                            help=f"epochs of each {stage} run (default: the scale's budget)")
    parser.add_argument("--launcher", default="inprocess",
                        help="inprocess (default), or a hydra/launcher to start each run with beit-lightning -m (slurm)")
    parser.add_argument("--launcher-override", action="append", default=[],
                        help="hydra.launcher.* settings for --launcher, e.g. hydra.launcher.partition=gpu (repeatable)")
    parser.add_argument("--parallel", type=int, default=0, help="runs of a stage at a time with --launcher (0: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their overrides; run nothing")
    parser.add_argument("--summary-only", action="store_true",
                        help="write the table from the runs finished so far; run nothing (e.g. while a cluster works)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .console import quiet_console

    quiet_console()
    scale = SCALES[args.scale]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    epochs = {stage: getattr(args, f"{stage}_epochs") for stage in ("tokenizer", "pretrain", "finetune", "probe")}
    epochs = {k: v for k, v in epochs.items() if v is not None}
    runs, setup = plan(out, scale, variants, list(range(args.seeds)), args.overrides, args.tokenizer,
                       args.pixel_norm, epochs)
    for note in setup.notes:
        print(note)
    if args.dry_run:
        for run in runs:
            command = (["beit-lightning", *run.overrides, f"output_dir={run.folder}"] if args.launcher == "inprocess"
                       else launcher_command(run, args.launcher, args.launcher_override))
            print(("(finished) " if run.finished else "") + shlex.join(command))
        return 0
    start = time.time()
    executed = 0 if args.summary_only else run_all(runs, args.launcher, args.launcher_override, args.parallel)
    budget = {**{s: getattr(scale, f"{s}_epochs") for s in ("pretrain", "finetune", "probe")}, **epochs}
    data = " ".join(args.overrides) or "the embedded generated data"
    title = (f"BEiT ablations, {args.scale} scale, {data}: {budget['pretrain'] or 'recipe'} pre-training / "
             f"{budget['finetune'] or 'recipe'} fine-tuning / {budget['probe'] or 'recipe'} probe epochs, {args.seeds} seed(s)")
    text = summarise(out, runs, title, setup.notes, plot=not args.no_plot)
    print(text)
    unfinished = sum(1 for r in runs if not r.finished)
    print(f"{executed} run(s) executed, {len(runs) - executed - unfinished} skipped as finished, {unfinished} unfinished, "
          f"{time.time() - start:.0f} s; "
          f"table: {out}/ablation.md, {out}/ablation.csv; plot: {out}/ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
