"""How much bf16 evaluation moves the segmentation scores (``task.eval_precision``, docs/recipes.md).

A micro BEiT + UperNet (4 blocks, 64-d, 8px patches, crop ``--crop``) is fitted in float32 for
``--steps`` steps on the three real ADE20K validation images shipped with the tests (the same images
serve as training and validation set: the point is a model whose predictions mean something, not a
score), then the same weights are evaluated twice under a ``bf16-mixed`` Trainer (bf16 autocast on
CPU), with ``eval_precision=fp32`` and ``=bf16``, and, as a baseline, before training. Printed per
seed: mIoU / mAcc / aAcc both ways, the share of labelled pixels whose predicted class differs, and
the largest logit difference relative to the largest logit.

    python benchmarks/seg_eval_precision.py --seeds 0 1 2 --steps 300
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from beit_lightning.data import ADE20KDataModule
from beit_lightning.models import BeitUperNet
from beit_lightning.tasks.segmentation import SemanticSegmentation

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "ade20k"


def ade20k_root(source: Path, folder: Path) -> Path:
    """An ``ADEChallengeData2016`` layout whose training and validation splits are both the sample."""
    root = folder / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            shutil.copytree(source / kind / "validation", root / kind / split)
    return root


def trainer(precision: str, max_steps: int = -1) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", precision=precision, max_steps=max_steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0 if max_steps > 0 else None)


def scores(task: SemanticSegmentation, dm: ADE20KDataModule, eval_precision: str) -> dict[str, float]:
    task.hparams.eval_precision = eval_precision
    task.on_validation_epoch_end = lambda: None  # read the confusion matrix here instead of logging it
    trainer("bf16-mixed").validate(task, dm, verbose=False)
    from beit_lightning.tasks.segmentation import scores_from_confusion

    result = scores_from_confusion(task.val_confusion.compute())
    task.val_confusion.reset()
    task.val_jaccard.reset()
    return {k: 100 * float(result[k]) for k in ("mIoU", "mAcc", "aAcc")}


@torch.no_grad()
def differences(task: SemanticSegmentation, dm: ADE20KDataModule) -> tuple[float, float]:
    """Share of labelled pixels whose class differs, and max |logit difference| / max |logit|."""
    changed = labelled = 0
    worst = 0.0
    for batch in dm.val_dataloader():
        size = batch["label"].shape[-2:]
        logits = {}
        for mode in ("fp32", "bf16"):
            task.hparams.eval_precision = mode
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits[mode] = task.predict_logits(batch["image"], size=size)
        keep = batch["label"] != task.hparams.ignore_index
        changed += int((logits["fp32"].argmax(1) != logits["bf16"].argmax(1))[keep].sum())
        labelled += int(keep.sum())
        worst = max(worst, float((logits["fp32"] - logits["bf16"]).abs().max() / logits["fp32"].abs().max()))
    return changed / labelled, worst


def run(seed: int, steps: int, crop: int, root: Path) -> None:
    pl.seed_everything(seed, verbose=False)
    dm = ADE20KDataModule(str(root), crop_size=crop, img_scale=(4 * crop, crop), num_workers=0, batch_size=3,
                          val_batch_size=1, seed=seed)
    model = BeitUperNet("beit_lightning_micro_patch8_32", num_classes=150, img_size=crop, out_indices=(0, 1, 2, 3),
                        channels=32, aux_channels=16, depth=4, use_abs_pos_emb=False, use_rel_pos_bias=True)
    task = SemanticSegmentation(model, num_classes=150, lr=2e-3, layer_decay=0.9, warmup_steps=10,
                                crop_size=crop, stride=crop * 2 // 3)
    for stage in ("random init", f"after {steps} steps"):
        if stage != "random init":
            task.train()  # Lightning keeps the modes it finds (validation left the modules in eval mode)
            trainer("32-true", steps).fit(task, dm)
        task.eval()
        fp32, bf16 = scores(task, dm, "fp32"), scores(task, dm, "bf16")
        changed, worst = differences(task, dm)
        print(f"seed {seed} {stage:>16}: mIoU {fp32['mIoU']:6.2f} (fp32) {bf16['mIoU']:6.2f} (bf16) "
              f"diff {bf16['mIoU'] - fp32['mIoU']:+.2f} | mAcc {bf16['mAcc'] - fp32['mAcc']:+.2f} | "
              f"aAcc {fp32['aAcc']:.2f} {bf16['aAcc'] - fp32['aAcc']:+.2f} | pixels changed {100 * changed:.2f}% | "
              f"max logit diff {100 * worst:.2f}% of max |logit|", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--data", type=Path, default=FIXTURE,
                        help="folder with images/validation and annotations/validation (ADE20K layout)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    with tempfile.TemporaryDirectory() as folder:
        root = ade20k_root(args.data, Path(folder))
        for seed in args.seeds:
            run(seed, args.steps, args.crop, root)


if __name__ == "__main__":
    main()
