"""How many visual tokens a tokenizer changes when it encodes in fp16 or bf16 instead of fp32.

The fraction of equal argmax tokens (``VisualTokenizer.tokens_in`` in each dtype, the code path of
``tokenizer.precision``) on generated images, with the fp32 logit margin (top-1 minus top-2)
that explains it: a token flips when the rounding error exceeds its margin. fp16 and bf16 run for
real on a CPU (an autocast region of that dtype: convolutions and matmuls in half precision, as
``encode`` does on a GPU), no emulation; ``encode`` itself would fall back to fp32 for fp16 there.

    # a trained dVAE (the DALL-E architecture, small: experiment=smoke_tokenizer's tokenizer.pt)
    python benchmarks/tokenizer_agreement.py --tokenizer /tmp/h2_tok/tokenizer.pt --images 256
    # OpenAI's encoder.pkl, or the full-size DALL-E architecture with seeded random weights
    python benchmarks/tokenizer_agreement.py --openai /data/dall_e/encoder.pkl --images 64
    python benchmarks/tokenizer_agreement.py --dall-e 256,2,8192 --image-size 112 --images 32
    # a small dVAE (DALL-E architecture) trained here first, when task=tokenizer is out of reach
    python benchmarks/tokenizer_agreement.py --train-dvae 16,1,512 --train-steps 150 --image-size 32
"""

from __future__ import annotations

import argparse

import torch
from torchvision.transforms.functional import to_tensor

from beit_lightning.data import GeneratedImages
from beit_lightning.tokenizers import DallETokenizer, DiscreteVAE, load_tokenizer


def train_dvae(args) -> tuple[torch.nn.Module, str]:
    """A DALL-E-architecture dVAE trained on generated images with task=tokenizer's loss (Gumbel
    softmax, logit-Laplace likelihood, KL to uniform), AdamW; images other than the measured ones."""
    n_hid, n_blk, vocab = (int(v) for v in args.train_dvae.split(","))
    steps = args.train_steps
    torch.manual_seed(args.seed)
    dvae = DiscreteVAE(vocab, args.image_size, n_hid, n_blk, n_init=n_hid, tau_anneal_steps=steps,
                       kl_warmup_steps=steps // 4, kl_weight=1.0)
    optimizer = torch.optim.AdamW(dvae.parameters(), lr=3e-3)
    data = GeneratedImages(steps * 16, image_size=args.image_size, seed=args.seed + 1)
    with torch.enable_grad():
        for step in range(steps):
            images = torch.stack([to_tensor(data[step * 16 + i][0]) for i in range(16)])
            losses = dvae.training_losses(images, step)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
    codes = len(torch.unique(losses["codes"]))
    return dvae.eval(), (f"dVAE {n_hid}/{n_blk}/{vocab} trained here {steps} steps x 16 images "
                         f"(last: nll {float(losses['nll']):.3f}, recon mse {float(losses['recon_mse']):.4f}, "
                         f"{codes} codes in the batch)")


def build(args) -> tuple[torch.nn.Module, str]:
    if args.train_dvae:
        return train_dvae(args)
    if args.tokenizer:
        return load_tokenizer(args.tokenizer), f"{args.tokenizer}"
    if args.openai:
        return DallETokenizer.from_openai(args.openai, image_size=args.image_size), f"OpenAI {args.openai}"
    n_hid, n_blk, vocab = (int(v) for v in args.dall_e.split(","))
    tokenizer = DallETokenizer(n_hid, n_blk, vocab, image_size=args.image_size, seed=args.seed)
    return tokenizer, f"DALL-E architecture {n_hid}/{n_blk}/{vocab}, random weights (seed {args.seed})"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="a tokenizer.pt of task=tokenizer (save_tokenizer)")
    source.add_argument("--openai", help="OpenAI's encoder.pkl")
    source.add_argument("--dall-e", help="n_hid,n_blk_per_group,vocab_size of a seeded random DALL-E encoder")
    source.add_argument("--train-dvae", help="n_hid,n_blk_per_group,vocab_size of a dVAE to train first")
    parser.add_argument("--train-steps", type=int, default=150, help="--train-dvae: optimiser steps (16 images each)")
    parser.add_argument("--image-size", type=int, default=112, help="tokenizer view (--openai, --dall-e, --train-dvae)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, what = build(args)
    tokenizer.eval()
    data = GeneratedImages(args.images, image_size=tokenizer.image_size, seed=args.seed)
    equal = {torch.float16: 0, torch.bfloat16: 0}
    margins, total = [], 0
    for start in range(0, args.images, args.batch_size):
        images = torch.stack([to_tensor(data[i][0]) for i in range(start, min(start + args.batch_size, args.images))])
        logits = tokenizer.encode_logits(images).float()
        top2 = logits.topk(2, dim=1).values
        margins.append((top2[:, 0] - top2[:, 1]).flatten())
        reference = tokenizer.tokens_in(images, torch.float32)
        for dtype in equal:
            equal[dtype] += int((tokenizer.tokens_in(images, dtype) == reference).sum())
        total += reference.numel()
    margin = torch.cat(margins)
    used = len(torch.unique(tokenizer.tokens_in(images, torch.float32)))
    print(f"tokenizer: {what}; {args.images} generated images at {tokenizer.image_size}px, {total} tokens "
          f"(last batch uses {used} of {tokenizer.vocab_size} codes)")
    print(f"fp32 top-1 minus top-2 logit: median {margin.median():.3g}, 1st percentile {margin.quantile(0.01):.3g}")
    print("| precision | tokens equal to fp32 |\n| --- | --- |")
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        print(f"| {name} | {equal[dtype] / total:.4%} ({total - equal[dtype]} of {total} differ) |")


if __name__ == "__main__":
    main()
