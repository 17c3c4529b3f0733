"""BEiT pre-training speed on one device, in one run: the whole step as shipped and with each switch,
the model alone (TFLOP/s, % of the dense bf16 peak), the tokenizer alone per precision, the data
loader, peak memory per image (BEiT-B, BEiT-L), beside a peer measured in the same run: Hugging Face
``transformers``' ``BeitForMaskedImageModeling`` (the configuration of ``benchmarks/pretrain_step.py``)
with the same tokenizer work and the same optimiser. Prints one Markdown table and writes it to ``--out``.

    python benchmarks/gpu_pretrain.py --device cuda --workers 16 --out gpu_pretrain.md   # ~4-5 min on an H200
    python benchmarks/gpu_pretrain.py --device cpu --tiny --out /tmp/tiny.md             # smoke test, not a figure

What a step is (``MaskedImageModeling.training_step`` as Lightning runs it under ``bf16-mixed``): the
task's ``_step`` (frozen tokenizer ``encode`` in its configured precision, then the model's forward and
the loss) under a bf16 autocast on CUDA (fp32 on a CPU), the finite-loss check (one host sync), backward,
gradient clipping at norm 3.0, the AdamW step of ``beit_lightning.optim.build_adamw`` over the task's
parameter groups. As shipped, AdamW is the multi-tensor one under mixed precision (Lightning refuses
gradient clipping with fused AdamW there) and fused in fp32; the "fused AdamW" row shows the other.
The peer's step: the same tokenizer ``encode`` then its forward with ``labels`` and the same backward,
clipping and optimiser. Real sizes: BEiT-B/16 (BEiT-L/16 for memory) at 224px, batch 128, 75 of 196
patches masked; the DALL-E encoder architecture with random weights of the real size (8192 codes,
n_hid 256, 2 blocks per group) at 112px. ``--tiny``: the micro BEiT (64-d, 2 blocks), 32px, batch 4,
a small dVAE encoder, 2 steps. The batch is the first one of the loader over generated JPEGs
(``benchmarks/data_throughput.make_jpeg_tree``, hard-linked copies to fill one epoch), whose rate is
taken in its steady state (:func:`loader_plan`).

Timing: ``--warmup`` untimed steps (compilation happens there and is reported apart), then ``--steps``
steps between two device synchronisations; images/s = steps x batch / time. Memory: the peak of
``torch.cuda.max_memory_allocated`` over a configuration's own steps (each configuration is built,
measured and freed alone) divided by the batch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from beit_lightning.data import ImageFolderDataModule
from beit_lightning.models import BeitForMaskedImageModeling
from beit_lightning.models.tokenizers import DallETokenizer
from beit_lightning.optim import build_adamw, param_groups
from beit_lightning.tasks import MaskedImageModeling, NonFiniteLossError

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
#: dense bf16 tensor peak (TFLOP/s, no sparsity) by a substring of ``torch.cuda.get_device_name()``, first match
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
GIB = 2**30
START = time.perf_counter()


@dataclass
class Sizes:
    """What one run measures: model, tokenizer, batch and loop sizes."""

    backbone: str
    large: str  # the large model, for memory
    backbone_kwargs: dict
    large_kwargs: dict
    img: int
    patch: int
    vocab: int
    n_hid: int
    n_blk: int
    tok_img: int
    masked: int
    min_block: int
    batch: int
    steps: int
    warmup: int
    large_steps: int
    loader_images: int
    loader_batches: int
    #: transformers' BeitConfig sizes of the peer (None: benchmarks/pretrain_step.py's BEiT-B)
    peer_sizes: dict | None = field(default=None)


REAL = Sizes(
    backbone="beit_base_patch16_224", large="beit_large_patch16_224", backbone_kwargs={}, large_kwargs={},
    img=224, patch=16, vocab=8192, n_hid=256, n_blk=2, tok_img=112, masked=75, min_block=16,
    batch=128, steps=10, warmup=2, large_steps=3, loader_images=512, loader_batches=24,
)
TINY = Sizes(
    backbone="beit_lightning_micro_patch8_32", large="beit_lightning_micro_patch8_32", backbone_kwargs={},
    large_kwargs=dict(embed_dim=96, depth=3, num_heads=3), img=32, patch=8, vocab=64, n_hid=16, n_blk=1,
    tok_img=32, masked=6, min_block=2, batch=4, steps=2, warmup=1, large_steps=1, loader_images=12,
    loader_batches=3,
    peer_sizes=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=32,
                    patch_size=8),
)


@dataclass
class Row:
    part: str
    config: str
    rate: float | None  # images/s
    base: str | None = None  # the row the ratio is taken against
    tflops: float | None = None
    mem: float | None = None  # GiB per image
    note: str = ""
    ratio: float | None = None


class Bench:
    """The device, the batch, the timing loop and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, batch: dict[str, torch.Tensor]) -> None:
        self.args, self.sizes, self.device = args, sizes, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        self.batch["mask"] = self.batch["mask"].bool()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.flops: dict[str, float] = {}
        self.ref_tokens: torch.Tensor | None = None
        self.peak = peak_tflops(self.device)

    # --- timing -------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        """bf16 autocast on CUDA (Lightning's ``bf16-mixed``), nothing on a CPU (fp32)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def time(self, fn: Callable[[], object], steps: int | None = None, warmup: int | None = None) -> tuple[float, float]:
        """(images/s over the timed steps, seconds of the warm-up steps)."""
        steps = self.args.steps if steps is None else steps
        warmup = self.args.warmup if warmup is None else warmup
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        self.sync()
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        self.sync()
        return steps * self.sizes.batch / (time.perf_counter() - start), warm

    @contextlib.contextmanager
    def measured_memory(self) -> Iterator[dict]:
        """Peak allocated memory per image of what runs inside (CUDA); frees it all afterwards."""
        out: dict = {}
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield out
        finally:
            if self.cuda:
                out["mem"] = torch.cuda.max_memory_allocated(self.device) / self.sizes.batch / GIB
                gc.collect()
                torch.cuda.empty_cache()

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - START:6.1f} s] {text}", flush=True)

    # --- builders -----------------------------------------------------------------------------
    def tokenizer(self, precision: str = "fp32", channels_last: bool = False, compile: bool = False) -> DallETokenizer:
        s = self.sizes
        with self.device:
            tok = DallETokenizer(n_hid=s.n_hid, n_blk_per_group=s.n_blk, vocab_size=s.vocab, image_size=s.tok_img, seed=0)
        return tok.eval().requires_grad_(False).configure_inference(precision, channels_last=channels_last, compile=compile)

    def model(self, attention: str = "sdpa", large: bool = False) -> BeitForMaskedImageModeling:
        s = self.sizes
        torch.manual_seed(0)
        name, kwargs = (s.large, s.large_kwargs) if large else (s.backbone, s.backbone_kwargs)
        with self.device:
            return BeitForMaskedImageModeling(name, vocab_size=s.vocab, img_size=s.img, drop_path_rate=0.1,
                                              attention=attention, **kwargs)

    def task(self, model: BeitForMaskedImageModeling, tokenizer: DallETokenizer, compile: bool) -> MaskedImageModeling:
        """The shipped task; ``compile`` is ``task.compile`` (the model's forward compiled in ``configure_model``)."""
        task = MaskedImageModeling(model, tokenizer, **({"compile": True} if compile else {}))
        task.configure_model()
        return task.to(self.device).train()

    def optimizer(self, model: torch.nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
        """``build_adamw`` as the task builds it: fused unless under mixed precision (CUDA here)."""
        fused = (not self.cuda) if fused is None else fused
        return build_adamw(param_groups(model, 0.05), lr=1e-6, betas=(0.9, 0.999), fused=fused)

    # --- steps --------------------------------------------------------------------------------
    def update(self, loss: torch.Tensor, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def task_step(self, task: MaskedImageModeling, opt: torch.optim.Optimizer) -> Callable[[], None]:
        params = [p for p in task.parameters() if p.requires_grad]

        def step() -> None:
            with self.autocast():
                loss, _, _ = task._step(self.batch)
            if task.hparams.check_finite_loss and not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(f"loss {loss.item()}")
            self.update(loss, params, opt)

        return step

    def model_step(self, task: MaskedImageModeling, opt: torch.optim.Optimizer, targets: torch.Tensor) -> Callable[[], None]:
        params = [p for p in task.parameters() if p.requires_grad]

        def step() -> None:
            with self.autocast():
                loss = task.loss(task(self.batch["image"], self.batch["mask"]), targets)
            self.update(loss, params, opt)

        return step

    def peer_step(self, peer: torch.nn.Module, tokenizer: DallETokenizer | None, opt: torch.optim.Optimizer,
                  targets: torch.Tensor) -> Callable[[], None]:
        params = [p for p in peer.parameters() if p.requires_grad]
        mask = self.batch["mask"]

        def step() -> None:
            labels = targets if tokenizer is None else tokenizer.encode(self.batch["tokenizer_image"])[mask]
            with self.autocast():
                loss = peer(pixel_values=self.batch["image"], bool_masked_pos=mask.flatten(1), labels=labels).loss
            self.update(loss, params, opt)

        return step

    def count_flops(self, key: str, step: Callable[[], None]) -> None:
        """FLOPs of one model step (forward + backward), counted by torch's FlopCounterMode on the eager model."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        self.flops[key] = float(counter.get_total_flops())

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.log(f"{row.part}: {row.config}: {fmt(row.rate, '.1f')} images/s" + (f" ({row.note})" if row.note else ""))
        return row


def peak_tflops(device: torch.device) -> float | None:
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for_name(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a CUDA device by its name (None: not in :data:`PEAK_BF16_TFLOPS`)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# --- data ---------------------------------------------------------------------------------------------

def _simple_jpegs(root: str, n: int, seed: int) -> None:
    """Gradients + noise at ImageNet sizes (used when benchmarks/data_throughput.py's generator is absent)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        w, h = ((500, 375), (468, 401))[i % 2]
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1.0, 3) + np.linspace(0, 80, h)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"{i:06d}.JPEG"), quality=90)


def _generator() -> tuple[Callable[[str, int, int], None], str]:
    sys.path.insert(0, BENCHMARKS)
    try:
        from data_throughput import make_jpeg_tree  # ImageNet-size generated JPEGs of the data benchmark
    except ImportError:
        return _simple_jpegs, "simple gradient+noise JPEGs (benchmarks/data_throughput.make_jpeg_tree not importable)"
    return make_jpeg_tree, "benchmarks/data_throughput.make_jpeg_tree"


def loader_plan(sizes: Sizes, workers: int) -> tuple[int, int]:
    """(batches skipped, batches timed). A DataLoader gives each worker whole batches, so the first
    ``workers`` batches arrive together after start-up: skip two rounds, then time at least two more."""
    rounds = max(1, workers)
    return 2 * rounds, max(sizes.loader_batches, 2 * rounds)


def make_images(root: str, sizes: Sizes, workers: int) -> str:
    """Generated real-size JPEGs under ``root``: ``sizes.loader_images`` distinct ones (made in up to
    ``workers`` processes), hard-linked as often as one epoch of :func:`measure_loader` needs (decoding
    costs the same; the page cache holds the distinct files). Returns what made them."""
    make, source = _generator()
    n = sizes.loader_images
    parts = max(1, min(workers, n // 32))
    counts = [n // parts + (k < n % parts) for k in range(parts)]
    folders = [os.path.join(root, "distinct", f"part{k}") for k in range(parts)]
    if parts == 1:
        make(folders[0], n, 0)
    else:
        with ProcessPoolExecutor(parts) as pool:
            list(pool.map(make, folders, counts, range(parts)))
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "distinct")) for f in names)
    skip, timed = loader_plan(sizes, workers)
    for copy in range(1, -(-(skip + timed + 1) * sizes.batch // len(files))):
        os.makedirs(os.path.join(root, f"copy{copy}"))
        for i, path in enumerate(files):
            os.link(path, os.path.join(root, f"copy{copy}", f"{i:06d}.JPEG"))
    return source


def measure_loader(bench_args: argparse.Namespace, sizes: Sizes, root: str, device_augment: bool = False) -> tuple[float, dict]:
    """Images/s of the pre-training DataModule with ``--workers`` workers in its steady state (see
    :func:`loader_plan`; worker start-up excluded), and its first batch. ``device_augment``: the
    workers carry the JPEGs and the views are made on ``--device`` (decode included in the time)."""
    dm = ImageFolderDataModule(
        root, train_dir="images", val_dir=None, labelled=False, mode="pretrain", batch_size=sizes.batch,
        num_workers=bench_args.workers, input_size=sizes.img, tokenizer_size=sizes.tok_img, patch_size=sizes.patch,
        num_masking_patches=sizes.masked, min_num_patches=sizes.min_block, device_augment=device_augment,
    )
    dm.setup("fit")
    device = torch.device(bench_args.device)

    def get(it) -> dict:
        batch = next(it)
        if device_augment:
            batch = dm.on_after_batch_transfer({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()} if batch is not None else batch
        return batch

    loader = dm.train_dataloader()
    skip, timed = loader_plan(sizes, bench_args.workers)
    it = iter(loader)
    first = get(it)
    for _ in range(skip - 1):
        get(it)
    start = time.perf_counter()
    for _ in range(timed):
        get(it)
    rate = timed * sizes.batch / (time.perf_counter() - start)
    del it, loader
    return rate, first


# --- the peer -----------------------------------------------------------------------------------------

def build_peer(bench: Bench) -> torch.nn.Module:
    """transformers' BeitForMaskedImageModeling: benchmarks/pretrain_step.py's BEiT-B configuration
    (shared relative position bias, no absolute position embedding, layer scale 0.1, drop path 0.1,
    SDPA attention), or the same flags at the tiny sizes."""
    torch.manual_seed(0)
    sizes = bench.sizes
    with bench.device:
        if sizes.peer_sizes is None:
            sys.path.insert(0, BENCHMARKS)
            from pretrain_step import hf_model

            return hf_model(argparse.Namespace(vocab_size=sizes.vocab)).train()
        from transformers import BeitConfig
        from transformers import BeitForMaskedImageModeling as HFBeit

        config = BeitConfig(
            vocab_size=sizes.vocab, use_mask_token=True, use_absolute_position_embeddings=False,
            use_relative_position_bias=False, use_shared_relative_position_bias=True, layer_scale_init_value=0.1,
            drop_path_rate=0.1, attn_implementation="sdpa", **sizes.peer_sizes,
        )
        return HFBeit(config).train()


# --- the measurements -----------------------------------------------------------------------------------

SHIPPED = "as shipped (tokenizer fp32, eager; attention sdpa)"


def kernel_check(bench: Bench) -> None:
    """sdpa_efficient and flex against the math-kernel SDPA on the device, fp32, at the run's head sizes
    (2 blocks, 4 images, random bias table): relative max difference of the output and of every gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kwargs = {**bench.sizes.backbone_kwargs, "depth": 2}
    images, mask = bench.batch["image"][:4].float(), bench.batch["mask"][:4]

    def run(attention: str):
        torch.manual_seed(0)
        with bench.device:
            model = BeitForMaskedImageModeling(bench.sizes.backbone, vocab_size=bench.sizes.vocab, img_size=bench.sizes.img,
                                               drop_path_rate=0.0, attention=attention, **kwargs)
            with torch.no_grad():
                model.backbone.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
        kernel = sdpa_kernel(SDPBackend.MATH) if attention == "sdpa" else contextlib.nullcontext()
        with kernel, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex on a CPU: its dense reference
            out = model(images, mask)
            out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run("sdpa")
    for attention in ("sdpa_efficient", "flex"):
        out, grads = run(attention)
        rel = max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in ref_grads.items())
        table = "backbone.rel_pos_bias.relative_position_bias_table"
        rel_table = float((grads[table] - ref_grads[table]).abs().max() / ref_grads[table].abs().max())
        line = (f"kernel check, {attention} vs math SDPA (fp32, {bench.device.type}): output {float((out - ref).abs().max() / ref.abs().max()):.1e}, "
                f"bias-table gradient {rel_table:.1e}, worst parameter gradient {rel:.1e} (relative max differences)")
        bench.notes.append(line)
        bench.log(line)


def whole_step_rows(bench: Bench, compile_rows: bool) -> None:
    """The whole step as shipped, then one switch at a time; model-only and tokenizer-only figures are
    taken on the same objects."""
    configs = [  # (label, tokenizer settings, attention, task.compile, fused AdamW)
        (SHIPPED, ("fp32", False, False), "sdpa", False, None),
        ("tokenizer fp16", ("fp16", False, False), "sdpa", False, None),
        ("tokenizer bf16", ("bf16", False, False), "sdpa", False, None),
        ("tokenizer fp32 + channels_last", ("fp32", True, False), "sdpa", False, None),
        ("tokenizer fp16 + channels_last", ("fp16", True, False), "sdpa", False, None),
        ("tokenizer bf16 + channels_last", ("bf16", True, False), "sdpa", False, None),
        ("attention sdpa_efficient", ("fp32", False, False), "sdpa_efficient", False, None),
        ("attention flex", ("fp32", False, False), "flex", False, None),
    ]
    if bench.cuda:
        configs.append(("fused AdamW (Lightning refuses it with clipping under bf16-mixed)", ("fp32", False, False), "sdpa",
                        False, True))
    if compile_rows:
        configs += [("tokenizer compile (fp32)", ("fp32", False, True), "sdpa", False, None),
                    ("model compile (task.compile)", ("fp32", False, False), "sdpa", True, None)]
    for label, tok_cfg, attention, compile_model, fused in configs:
        measure_config(bench, label, tok_cfg, attention, compile_model, fused)
    if bench.cuda:  # cuDNN's autotuner for the tokenizer's convolutions (off as shipped: trainer.benchmark=true)
        shipped = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        for tok_cfg in (("fp32", False, False), ("fp16", True, False)):
            label = f"tokenizer {tok_cfg[0]}{' + channels_last' if tok_cfg[1] else ''} + cudnn.benchmark (trainer.benchmark=true)"
            measure_config(bench, label, tok_cfg, "sdpa", False, None)
        torch.backends.cudnn.benchmark = shipped
    if compile_rows:  # the switches together, with the attention that ran the model fastest
        model_rows = {r.config: r.rate for r in bench.rows if r.part == "model only" and r.config.startswith(("attention", SHIPPED))}
        best = max(model_rows, key=lambda k: model_rows[k] or 0.0)
        attention = {SHIPPED: "sdpa"}.get(best, best.removeprefix("attention ").split(" ")[0])
        measure_config(bench, f"all: tokenizer fp16 + channels_last + compile, model compile, attention {attention}",
                       ("fp16", True, True), attention, True, None)


def measure_config(bench: Bench, label: str, tok_cfg: tuple, attention: str, compile_model: bool, fused: bool | None) -> None:
    model_switch = attention != "sdpa" or compile_model or fused is not None or label == SHIPPED
    tokenizer_switch = label == SHIPPED or attention == "sdpa" and not compile_model and fused is None
    with bench.measured_memory() as memory:
        tokenizer = bench.tokenizer(*tok_cfg)
        task = bench.task(bench.model(attention), tokenizer, compile_model)
        opt = bench.optimizer(task.model, fused)
        rate, warm = bench.time(bench.task_step(task, opt))
        compiled = compile_model or tok_cfg[2] or (attention == "flex" and bench.cuda)  # flex: its kernel
        note = f"warm-up {warm:.0f} s incl. compilation" if compiled else ""
        if model_switch:
            if bench.ref_tokens is None:
                bench.ref_tokens = tokenizer.encode(bench.batch["tokenizer_image"])
            targets = bench.ref_tokens[bench.batch["mask"]]
            step = bench.model_step(task, opt, targets)
            if "ours" not in bench.flops:
                bench.count_flops("ours", step)
            model_rate, _ = bench.time(step, warmup=1)
        if tokenizer_switch:
            tok_rate, _ = bench.time(lambda t=tokenizer: t.encode(bench.batch["tokenizer_image"]), warmup=1)
            tokens = tokenizer.encode(bench.batch["tokenizer_image"])
            if bench.ref_tokens is None:
                bench.ref_tokens = tokens
            agree = float((tokens == bench.ref_tokens).float().mean())
        del task, opt, tokenizer
    bench.add(Row("whole step", label, rate, base="peer fp32", mem=memory.get("mem"), note=note))
    if model_switch:
        bench.add(Row("model only", label, model_rate, base="peer model", tflops=bench.flops["ours"] * model_rate / bench.sizes.batch / 1e12))
    if tokenizer_switch:
        fallback = ", computed in fp32 on a CPU (the tokenizer's fallback)" if tok_cfg[0] == "fp16" and not bench.cuda else ""
        bench.add(Row("tokenizer only", "fp32 (as shipped)" if label == SHIPPED else label.removeprefix("tokenizer "), tok_rate,
                      base="tokenizer fp32", note=f"{agree:.2%} of tokens equal to fp32{fallback}"))


def peer_rows(bench: Bench) -> None:
    """The peer's whole step with the tokenizer in fp32 (our default) and in fp16 (the official loop's
    precision: OpenAI's dVAE convolutions run in float16 on CUDA), and the peer model alone."""
    for precision in ("fp32", "fp16"):
        with bench.measured_memory() as memory:
            peer, tokenizer = build_peer(bench), bench.tokenizer(precision)
            opt = bench.optimizer(peer)
            targets = bench.ref_tokens[bench.batch["mask"]]
            rate, _ = bench.time(bench.peer_step(peer, tokenizer, opt, targets))
            if precision == "fp32":
                step = bench.peer_step(peer, None, opt, targets)
                bench.count_flops("peer", step)
                model_rate, _ = bench.time(step, warmup=1)
            del peer, tokenizer, opt
        bench.add(Row("whole step", f"peer: transformers, tokenizer {precision}", rate, base="peer fp32", mem=memory.get("mem")))
    bench.add(Row("model only", "peer: transformers", model_rate, base="peer model",
                  tflops=bench.flops["peer"] * model_rate / bench.sizes.batch / 1e12))


def large_row(bench: Bench) -> None:
    """BEiT-L as shipped: memory per image (and a short throughput figure)."""
    sizes = " ".join(f"{k}={v}" for k, v in bench.sizes.large_kwargs.items())
    label = f"BEiT-L ({' '.join(filter(None, (bench.sizes.large, sizes)))}), as shipped"
    try:
        with bench.measured_memory() as memory:
            task = bench.task(bench.model("sdpa", large=True), bench.tokenizer("fp32"), False)
            opt = bench.optimizer(task.model)
            rate, _ = bench.time(bench.task_step(task, opt), steps=bench.sizes.large_steps, warmup=1)
            del task, opt
    except torch.OutOfMemoryError:
        bench.add(Row("whole step", label, None, note=f"out of memory at batch {bench.sizes.batch}"))
        return
    bench.add(Row("whole step", label, rate, mem=memory.get("mem"),
                  note=f"{bench.sizes.large_steps} timed steps"))


# --- the table ------------------------------------------------------------------------------------------

def finish_rows(bench: Bench, loader_rate: float, device_loader_rate: float) -> None:
    by_key = {
        "peer fp32": next(r.rate for r in bench.rows if r.config == "peer: transformers, tokenizer fp32"),
        "peer model": next(r.rate for r in bench.rows if r.config == "peer: transformers"),
        "tokenizer fp32": next(r.rate for r in bench.rows if r.part == "tokenizer only" and r.config == "fp32 (as shipped)"),
    }
    for row in bench.rows:
        if row.rate is not None and row.base in by_key:
            row.ratio = row.rate / by_key[row.base]
    bench.rows.append(Row("loader", f"ImageFolderDataModule, {bench.args.workers} workers, generated JPEGs", loader_rate,
                          note="must keep up with the whole step's images/s"))
    bench.rows.append(Row("loader", f"same, data.device_augment=true (decode and views on {bench.args.device})",
                          device_loader_rate, note="the device's time is taken from the step's"))


def table(bench: Bench) -> str:
    against = {"peer fp32": "peer whole step (tokenizer fp32)", "peer model": "peer model only",
               "tokenizer fp32": "tokenizer fp32"}
    lines = ["| part | configuration | images/s | ratio | against | TFLOP/s | % of dense bf16 peak | peak GiB / image | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in bench.rows:
        pct = None if r.tflops is None or bench.peak is None else 100 * r.tflops / bench.peak
        lines.append(f"| {r.part} | {r.config} | {fmt(r.rate, '.1f')} | {fmt(r.ratio, '.2f')}{'x' if r.ratio else ''} | "
                     f"{against.get(r.base, '') if r.ratio else ''} | {fmt(r.tflops, '.3g')} | {fmt(pct, '.1f')} | "
                     f"{fmt(r.mem, '.3f')} | {r.note} |")
    return "\n".join(lines)


def header(bench: Bench, source: str) -> list[str]:
    s, a = bench.sizes, bench.args
    device = torch.cuda.get_device_name(bench.device) if bench.cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    import timm
    import transformers

    return [
        f"device: {device}; dense bf16 peak {fmt(bench.peak, '.0f')} TFLOP/s; torch {torch.__version__}, timm {timm.__version__}, "
        f"transformers {transformers.__version__}; precision {'bf16 autocast' if bench.cuda else 'fp32'}",
        f"model {s.backbone} at {s.img}px, batch {s.batch}, {s.masked} masked patches; tokenizer DALL-E architecture "
        f"(random weights, {s.vocab} codes, n_hid {s.n_hid}, {s.n_blk} blocks per group) at {s.tok_img}px; "
        f"{a.steps} timed steps after {a.warmup} warm-up; loader images: {source}",
        f"FLOPs per model step (forward + backward, FlopCounterMode): ours {bench.flops.get('ours', 0) / 1e9:.4g} GFLOP, "
        f"peer {bench.flops.get('peer', 0) / 1e9:.4g} GFLOP (it computes the LM head on every patch)",
        *bench.notes,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="micro BEiT, 32px, batch 4, 2 steps (a smoke run)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader worker processes")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default: 10, tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per configuration (default: 2, tiny 1)")
    parser.add_argument("--batch-size", type=int, help="default: 128, tiny 4")
    parser.add_argument("--no-compile", action="store_true", help="leave out the rows that compile")
    parser.add_argument("--threads", type=int, help="torch threads on a CPU (default: torch's; --tiny: 1, which a "
                        "shared machine runs far faster than spinning thread pools)")
    parser.add_argument("--out", help="write the Markdown table (and the run's description) to this file")
    args = parser.parse_args(argv)
    given = {attr: getattr(args, name) for name, attr in (("steps", "steps"), ("warmup", "warmup"), ("batch_size", "batch"))}
    sizes = replace(TINY if args.tiny else REAL, **{k: v for k, v in given.items() if v is not None})
    args.steps, args.warmup = sizes.steps, sizes.warmup
    threads = args.threads or (1 if args.tiny and args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device: run with --device cpu --tiny for a smoke run")

    with tempfile.TemporaryDirectory() as tmp:
        source = make_images(os.path.join(tmp, "images"), sizes, args.workers)
        loader_rate, first = measure_loader(args, sizes, tmp)
        device_loader_rate, _ = measure_loader(args, sizes, tmp, device_augment=True)
    bench = Bench(args, sizes, first)
    bench.log(f"loader: {loader_rate:.1f} images/s with {args.workers} workers ({source}); "
              f"device_augment: {device_loader_rate:.1f}")
    kernel_check(bench)
    whole_step_rows(bench, compile_rows=not args.no_compile)
    peer_rows(bench)
    large_row(bench)
    finish_rows(bench, loader_rate, device_loader_rate)
    text = "\n".join([*(f"- {line}" for line in header(bench, source)), "", table(bench), ""])
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
