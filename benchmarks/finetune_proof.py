"""The paper's central comparison at a size a CPU can run: does BEiT pre-training help?

1. train a dVAE tokenizer on the generated images (experiment=smoke_tokenizer);
2. pre-train the micro BEiT by masked image modeling on all generated training images;
3. fine-tune it on a small labelled subset (experiment=smoke_finetune, init_checkpoint=...);
4. train the same network from scratch with the same recipe, data and budget;
and print both validation accuracies. Every stage is the project's own Hydra recipe.

    python benchmarks/finetune_proof.py --out outputs/proof
"""

from __future__ import annotations

import argparse
import os
import time

from hydra import compose, initialize_config_module

from beit_lightning.cli import train


def run(overrides: list[str]) -> float | None:
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return train(cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="outputs/proof")
    parser.add_argument("--pretrain-images", type=int, default=2048)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--labelled", type=int, default=256, help="labelled images for fine-tuning")
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--val", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    quiet = ["trainer.enable_progress_bar=false", f"seed={args.seed}"]
    start = time.time()

    tokenizer = os.path.join(out, "tokenizer", "tokenizer.pt")
    if not os.path.isfile(tokenizer):
        run(["experiment=smoke_tokenizer", f"output_dir={os.path.dirname(tokenizer)}", *quiet])
    pretrain_dir = os.path.join(out, "pretrain")
    run(["experiment=smoke", "tokenizer=dvae", f"tokenizer.checkpoint={tokenizer}", "tokenizer.vocab_size=512",
         "tokenizer.image_size=64", f"data.num_train={args.pretrain_images}", f"trainer.max_epochs={args.pretrain_epochs}",
         "task.warmup_steps=50", f"output_dir={pretrain_dir}", *quiet])
    ckpt = os.path.join(pretrain_dir, "checkpoints", "last.ckpt")
    finetune = ["experiment=smoke_finetune", f"data.num_train={args.labelled}", f"data.num_val={args.val}",
                f"trainer.max_epochs={args.finetune_epochs}", "trainer.check_val_every_n_epoch=5", *quiet]
    pretrained = run([*finetune, f"init_checkpoint={ckpt}", f"output_dir={os.path.join(out, 'finetune')}"])
    scratch = run([*finetune, f"output_dir={os.path.join(out, 'scratch')}"])
    print(f"\nmicro BEiT (64-d, 2 blocks, 64px, 8x8 patches) on generated shapes, {args.labelled} labelled images, "
          f"{args.finetune_epochs} epochs, {args.val} validation images (10 classes, chance 0.10):")
    print(f"  pre-trained by BEiT ({args.pretrain_images} images x {args.pretrain_epochs} epochs) then fine-tuned: "
          f"top-1 {pretrained:.3f}")
    print(f"  same recipe from random initialisation:                          top-1 {scratch:.3f}")
    print(f"  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
