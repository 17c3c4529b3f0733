"""The GPU pre-training step's switches, proven on CPU: the tokenizer's precision, channels-last
and compile; compiling the model; gathering masked positions with no host sync; and the stop on
a non-finite loss or gradient that skips the update on the device and reads the flag every N steps."""

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from beit_lightning.models.beit import gather_masked
from beit_lightning.tasks import NonFiniteLossError
from beit_lightning.tokenizers import DallETokenizer, DiscreteVAE, load_tokenizer, save_tokenizer
from conftest import TESTS
from test_pretraining import FixedBatches, _task, _trainer


def _tiny_dall_e(**kw):
    return DallETokenizer(n_hid=16, n_blk_per_group=1, vocab_size=64, image_size=32, seed=0, **kw)


def _images(n=8, size=32):
    torch.manual_seed(1)
    return torch.rand(n, 3, size, size)


def _dtype_of_first_conv(tokenizer, images):
    seen = []
    handle = tokenizer.encoder.blocks.input.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tokenizer.encode(images)
    handle.remove()
    return seen[0]


# --- tokenizer precision -----------------------------------------------------------------------

def test_precision_switch_changes_the_dtype_the_tokenizer_computes_in():
    images = _images()
    tokenizer = _tiny_dall_e()
    assert _dtype_of_first_conv(tokenizer, images) == torch.float32
    assert _dtype_of_first_conv(tokenizer.configure_inference("bf16"), images) == torch.bfloat16
    assert tokenizer.compute_dtype(torch.device("cuda")) == torch.bfloat16
    assert tokenizer.configure_inference("fp16").compute_dtype(torch.device("cuda")) == torch.float16
    assert all(p.dtype == torch.float32 for p in tokenizer.parameters())  # weights untouched: autocast casts per call
    with pytest.raises(ValueError, match="one of"):
        tokenizer.configure_inference("fp8")


def test_fp16_on_cpu_falls_back_to_fp32_with_one_warning():
    images = _images()
    reference = _tiny_dall_e().encode(images)
    tokenizer = _tiny_dall_e(precision="fp16")
    with pytest.warns(UserWarning, match="precision=fp16 on a CPU encodes in float32"):
        tokens = tokenizer.encode(images)
    assert torch.equal(tokens, reference)  # it really ran in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dtype_of_first_conv(tokenizer, images) == torch.float32  # no second warning


def test_half_precisions_agree_with_fp32_on_most_tokens():
    # a random tiny DALL-E encoder is the worst case (small logit margins); a trained one agrees more
    # (benchmarks/RESULTS.md). fp16 runs on a CPU through tokens_in, which has no fallback.
    images = _images(16)
    tokenizer = _tiny_dall_e()
    reference = tokenizer.tokens_in(images, torch.float32)
    for dtype, least in ((torch.float16, 0.97), (torch.bfloat16, 0.85)):
        agreement = (tokenizer.tokens_in(images, dtype) == reference).float().mean().item()
        assert agreement >= least, (dtype, agreement)


def test_channels_last_keeps_weights_and_tokens():
    images = _images()
    tokenizer = _tiny_dall_e()
    state = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    reference = tokenizer.encode(images)
    tokenizer.configure_inference(channels_last=True)
    assert tokenizer.encoder.blocks.input.w.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v, tokenizer.state_dict()[k]) for k, v in state.items())
    assert (tokenizer.encode(images) == reference).float().mean() > 0.99  # same math, other summation order


def test_every_tokenizer_config_has_the_inference_keys_and_the_targets_take_them(tmp_path):
    for path in sorted((TESTS.parent / "conf" / "tokenizer").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert (cfg.precision, cfg.channels_last, cfg.compile) == ("fp32", False, False), path.name
    assert _tiny_dall_e(precision="bf16", channels_last=True).precision == "bf16"
    dvae = DiscreteVAE(vocab_size=64, image_size=32, n_hid=16, n_blk_per_group=1, n_init=16)
    save_tokenizer(dvae, tmp_path / "t.pt")
    loaded = load_tokenizer(tmp_path / "t.pt", precision="bf16", compile=True)
    assert (loaded.precision, loaded.compile_encode, loaded.channels_last) == ("bf16", True, False)


def test_a_copy_of_a_compiled_tokenizer_does_not_share_its_compiled_encoding():
    tokenizer = _tiny_dall_e(compile=True)
    tokenizer.__dict__["_compiled_tokens"] = object()  # stands for the compiled function
    clone = copy.deepcopy(tokenizer)
    assert "_compiled_tokens" not in clone.__dict__ and clone.compile_encode


# --- no host sync: gathering masked positions ---------------------------------------------------

def test_gather_masked_equals_boolean_indexing_for_exact_masks():
    torch.manual_seed(0)
    mask = torch.zeros(5, 4, 4, dtype=torch.bool)
    for row in mask.view(5, -1):
        row[torch.randperm(16)[:6]] = True
    x = torch.randn(5, 16, 3)
    assert torch.equal(gather_masked(x, mask, 6), x[mask.flatten(1)])
    tokens = torch.randint(0, 64, (5, 4, 4))
    assert torch.equal(gather_masked(tokens.flatten(1), mask, 6), tokens[mask])


def test_step_with_host_counted_masks_equals_boolean_indexing():
    task = _task().eval()
    batch = next(iter(DataLoader(FixedBatches(8), batch_size=8)))
    with torch.no_grad():
        plain = task._step(batch)
        counted = task._step(task.on_before_batch_transfer(dict(batch), 0))
    assert "num_masked" in task.on_before_batch_transfer(dict(batch), 0)
    assert all(torch.equal(a, b) for a, b in zip(plain, counted, strict=True))
    uneven = dict(batch, mask=batch["mask"].clone())
    uneven["mask"][0].view(-1)[:] = False
    assert "num_masked" not in task.on_before_batch_transfer(uneven, 0)


# --- compile ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_model_matches_eager_loss_and_gradients():
    eager = _task()
    compiled = copy.deepcopy(eager)
    compiled.hparams.compile = True
    compiled.configure_model()
    batch = eager.on_before_batch_transfer(next(iter(DataLoader(FixedBatches(8), batch_size=8))), 0)
    losses = []
    for task in (eager, compiled):
        loss = task._step(batch)[0]
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-5)  # fp32: only summation order differs
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled in place: plain keys


@pytest.mark.slow
def test_compiled_tokenizer_gives_the_eager_tokens():
    images = _images()
    assert torch.equal(_tiny_dall_e(compile=True).encode(images), _tiny_dall_e().encode(images))


# --- non-finite values: skipped on the device, read every N steps -------------------------------

class NanAt(Dataset):
    """Fixed samples in order; the samples of batch ``bad_batch`` (of 8) have a NaN pixel."""

    def __init__(self, n, bad_batch):
        self.samples = FixedBatches(n).samples
        for i in range(8 * bad_batch, 8 * bad_batch + 8):
            self.samples[i] = dict(self.samples[i], image=self.samples[i]["image"].clone())
            self.samples[i]["image"][0, 0, 0] = float("nan")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class Snapshot(pl.Callback):
    """The model's weights at the start of optimiser step ``step``."""

    def __init__(self, step):
        self.step, self.weights = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.weights is None:
            self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class NanGradientAt(pl.Callback):
    """A finite loss but a NaN gradient at step ``step`` (what a loss check alone lets through)."""

    def __init__(self, step):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            pl_module.model.mask_token.grad[0, 0, 0] = float("nan")


@pytest.mark.parametrize("precision, inject, checkpoints", [
    ("32-true", "loss", True), ("32-true", "gradient", False), ("bf16-mixed", "loss", False)])
def test_non_finite_step_is_skipped_on_device_and_stops_within_n_steps(tmp_path, precision, inject, checkpoints):
    bad, every = 2, 4
    snapshot = Snapshot(bad)
    callbacks = [snapshot] + ([NanGradientAt(bad)] if inject == "gradient" else [])
    if checkpoints:  # every step: the save after the bad step reads the flag first, and refuses
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1))
    task = _task(check_finite_every_n_steps=every)
    trainer = _trainer(tmp_path, max_steps=12, precision=precision, enable_checkpointing=checkpoints,
                       callbacks=callbacks)
    data = NanAt(48, bad) if inject == "loss" else FixedBatches(48)
    with pytest.raises(NonFiniteLossError, match=f"non-finite at step {bad}"):
        trainer.fit(task, DataLoader(data, batch_size=8))
    assert task._skip_on_device and trainer.optimizers[0].param_groups[0]["fused"]
    assert bad < trainer.global_step <= bad + every  # raised within N steps of the bad one
    after = task.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(v, after[k]) for k, v in snapshot.weights.items())  # no update from step 2 on
    assert all(int(s["step"]) == bad for s in trainer.optimizers[0].state.values())  # Adam's counts too
    if not checkpoints:
        assert trainer.global_step == every  # the periodic check
        return
    assert trainer.global_step == bad + 1  # the checkpoint's check
    newest = max((tmp_path / "ckpt").glob("*.ckpt"), key=lambda p: torch.load(p, weights_only=True)["global_step"])
    saved = torch.load(newest, weights_only=True)
    assert saved["global_step"] == bad  # no checkpoint was written after the bad step
    assert all(torch.equal(v, saved["state_dict"][f"model.{k}"]) for k, v in snapshot.weights.items())


def test_a_non_fused_optimizer_falls_back_to_the_per_step_check(tmp_path):
    class ForeachAdamW(type(_task())):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3, foreach=True)

    task = _task()
    task.__class__ = ForeachAdamW
    trainer = _trainer(tmp_path, max_steps=5)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        trainer.fit(task, DataLoader(FixedBatches(8, nan=True), batch_size=8))
    assert not task._skip_on_device and trainer.global_step == 0
    assert all(torch.isfinite(p).all() for p in task.parameters())
