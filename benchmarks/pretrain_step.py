"""Time one BEiT pre-training step (forward, backward, AdamW) of our model against Hugging Face
``transformers``' ``BeitForMaskedImageModeling`` with the same configuration and the same batch.

Both models: BEiT-B/16 at 224px, shared relative position bias, no absolute position embedding,
layer scale 0.1, drop path 0.1, 8192-token vocabulary, 75 of 196 patches masked in blocks,
and the same optimiser: fused AdamW (what our tasks build by default) over the same parameter
groups logic for both, so the ratio compares the models. Steps of the two models are interleaved so that machine noise hits both alike; the
median step time of each is reported with the ratio.

    python benchmarks/pretrain_step.py                      # CPU, fp32, batch 8
    python benchmarks/pretrain_step.py --device cuda --precision bf16 --batch-size 64 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from beit_lightning.data import BlockwiseMaskGenerator
from beit_lightning.models import BeitForMaskedImageModeling
from beit_lightning.optim import build_adamw, param_groups


def hf_model(args):
    from transformers import BeitConfig
    from transformers import BeitForMaskedImageModeling as HFBeit

    config = BeitConfig(
        vocab_size=args.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, image_size=224, patch_size=16, use_mask_token=True,
        use_absolute_position_embeddings=False, use_relative_position_bias=False,
        use_shared_relative_position_bias=True, layer_scale_init_value=0.1, drop_path_rate=0.1,
        attn_implementation="sdpa",
    )
    return HFBeit(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    ours = BeitForMaskedImageModeling("beit_base_patch16_224", vocab_size=args.vocab_size, drop_path_rate=0.1)
    peer = hf_model(args)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_peer = sum(p.numel() for p in peer.parameters())

    gen = BlockwiseMaskGenerator(14, 75, min_num_patches=16, seed=0)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    masks = torch.stack([gen() for _ in range(args.batch_size)]).to(device)
    targets = torch.randint(0, args.vocab_size, (int(masks.sum()),), device=device)

    def autocast():
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step_ours(model, opt):
        with autocast():
            logits = model(images, masks)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_peer(model, opt):
        with autocast():
            out = model(pixel_values=images, bool_masked_pos=masks.flatten(1), labels=targets)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    runs = {}
    for name, model, fn in (("beit-lightning", ours, step_ours), ("transformers", peer, step_peer)):
        model.to(device).train()
        runs[name] = (model, build_adamw(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.999)), fn, [])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup + args.steps):
        for _name, (model, opt, fn, times) in runs.items():
            sync()
            start = time.perf_counter()
            fn(model, opt)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, precision {args.precision}, "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"parameters: beit-lightning {n_ours / 1e6:.2f} M, transformers {n_peer / 1e6:.2f} M")
    medians = {}
    for name, (_, _, _, times) in runs.items():
        medians[name] = statistics.median(times)
        print(f"{name:15s} median step {medians[name]:.3f} s  ->  {args.batch_size / medians[name]:.2f} images/s")
    print(f"speed ratio (transformers step time / ours): {medians['transformers'] / medians['beit-lightning']:.2f}x")


if __name__ == "__main__":
    main()
