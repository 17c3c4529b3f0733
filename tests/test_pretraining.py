import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from beit_lightning.data import BeitPretrainTransform, BlockwiseMaskGenerator, GeneratedImages
from beit_lightning.optim import cosine_schedule
from beit_lightning.tasks import MaskedImageModeling, NonFiniteLossError
from conftest import ColourTokenizer, micro_model


class FixedBatches(Dataset):
    """The same samples every epoch (fixed masks), so that loss changes come from learning."""

    def __init__(self, n=16, nan=False):
        images = GeneratedImages(n, image_size=32)
        transform = BeitPretrainTransform(32, 32, BlockwiseMaskGenerator(4, 6, min_num_patches=2), scale=(0.4, 1.0))
        torch.manual_seed(0)
        self.samples = [transform(images[i][0]) for i in range(n)]
        if nan:
            self.samples[0]["image"][0, 0, 0] = float("nan")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=3.0,
                default_root_dir=tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


def _task(**kw):
    args = dict(lr=3e-3, min_lr=1e-4, warmup_steps=4, weight_decay=0.05)
    args.update(kw)
    return MaskedImageModeling(micro_model(vocab_size=64, drop_path_rate=0.0), ColourTokenizer(), **args)


def _loss_on(task, batch):
    task.eval()
    with torch.no_grad():
        return task._step(batch)[0].item()


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    data = FixedBatches()
    batch = next(iter(DataLoader(data, batch_size=16)))
    task = _task()
    before = _loss_on(task, batch)
    assert before == pytest.approx(math.log(64), abs=0.3)  # an untrained model is near chance
    _trainer(tmp_path).fit(task, DataLoader(data, batch_size=8, shuffle=True))
    after = _loss_on(task, batch)
    targets = task.targets(batch["tokenizer_image"], batch["mask"])
    counts = torch.bincount(targets, minlength=64).float()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = -(p * p.log()).sum().item()  # what predicting the token frequencies achieves
    assert after < 0.8 * unigram_entropy < before


def test_tokenizer_stays_frozen_in_eval_mode_and_out_of_checkpoints(tmp_path):
    task = _task()
    task.train()
    assert not task.tokenizer.training and task.model.training
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(task, DataLoader(FixedBatches(8), batch_size=8))
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("tokenizer.")]
    assert any(k.startswith("model.backbone.") for k in ckpt["state_dict"])
    restored = MaskedImageModeling.load_from_checkpoint(path, model=micro_model(vocab_size=64), tokenizer=ColourTokenizer())
    assert torch.equal(restored.model.mask_token, task.model.mask_token)
    assert restored.hparams.lr == task.hparams.lr




def test_non_finite_loss_stops_before_updating(tmp_path):
    # the fused AdamW skips the update on the device; the host reads the flag at the epoch's end
    # (tests/test_gpu_step.py: every N steps, before checkpoints, the per-step fallback)
    task = _task()
    before = {k: v.clone() for k, v in task.state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=5)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 0"):
        trainer.fit(task, DataLoader(FixedBatches(8, nan=True), batch_size=8))
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in before.items())


def test_resume_from_lightning_checkpoint_continues_schedule_and_optimizer(tmp_path):
    data = FixedBatches(16)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    task = _task(warmup_steps=2)
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt_cb])
    trainer.fit(task, DataLoader(data, batch_size=8))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3

    resumed = _task(warmup_steps=2)
    trainer2 = _trainer(tmp_path, max_steps=8)
    trainer2.fit(resumed, DataLoader(data, batch_size=8), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer2.global_step == 8
    total = 8  # estimated_stepping_batches = max_steps
    expected = cosine_schedule(8, total, 2, 3e-3, 1e-4)
    assert trainer2.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    state = trainer2.optimizers[0].state_dict()["state"]
    assert int(next(iter(state.values()))["step"]) == 8  # Adam moments continued from step 3


def test_param_groups_and_weight_decay_schedule(tmp_path):
    task = _task(weight_decay=0.05, weight_decay_end=0.5)
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(task, DataLoader(FixedBatches(8), batch_size=8))
    decay, no_decay = trainer.optimizers[0].param_groups
    named = {id(p): n for n, p in task.model.named_parameters()}
    no_decay_names = {named[id(p)] for p in no_decay["params"]}
    # the official optim_factory.py with no_weight_decay() == {pos_embed, cls_token}: 1-d tensors, biases and
    # the cls token are exempt; the mask token and the shared relative position table are decayed
    assert {"backbone.cls_token", "lm_head.bias", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.gamma_1",
            "backbone.blocks.0.attn.q_bias", "backbone.patch_embed.proj.bias"} <= no_decay_names
    decay_names = {named[id(p)] for p in decay["params"]}
    assert {"mask_token", "backbone.rel_pos_bias.relative_position_bias_table", "backbone.blocks.0.attn.qkv.weight",
            "backbone.patch_embed.proj.weight", "lm_head.weight"} <= decay_names
    assert decay_names | no_decay_names == set(named.values()) and no_decay["weight_decay"] == 0
    # last step run was global_step 3 of 4: cosine from 0.05 towards 0.5
    assert decay["weight_decay"] == pytest.approx(cosine_schedule(3, 4, 0, 0.05, 0.5))


def test_model_and_tokenizer_must_fit_together():
    with pytest.raises(ValueError, match="model.vocab_size=64"):
        MaskedImageModeling(micro_model(vocab_size=100), ColourTokenizer())
    with pytest.raises(ValueError, match="image_size to 32"):
        MaskedImageModeling(micro_model(vocab_size=64), ColourTokenizer(image_size=64))


def test_warmup_cosine_schedule_values():
    assert cosine_schedule(0, 100, 10, 1.0, 0.1) == 0.0
    assert cosine_schedule(5, 100, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert cosine_schedule(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_schedule(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
