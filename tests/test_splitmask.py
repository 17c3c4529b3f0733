"""SplitMask (arXiv 2112.10740): the split, the encoder on one half, InfoNCE, learning, checkpoints
and the shipped configs."""

import math

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, Dataset

from beit_lightning.checkpoints import load_checkpoint
from beit_lightning.data import BeitPretrainTransform, GeneratedImages, RandomSplitGenerator
from beit_lightning.data.datamodule import BeitDataModule
from beit_lightning.models import SplitMaskModel, create_classifier, create_segmenter
from beit_lightning.models.splitmask import info_nce, split_indices
from beit_lightning.tasks import SplitMaskPretraining
from conftest import ColourTokenizer

MICRO = "beit_lightning_micro_patch8_32"
ABS_POS = dict(use_abs_pos_emb=True, use_shared_rel_pos_bias=False)
BACKBONES = {
    "beit_shared_rel_pos": (MICRO, {}),
    "beit_abs_pos": (MICRO, ABS_POS),
    "vit": ("vit_tiny_patch16_224", dict(arch=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2))),
}


def _model(kind="beit_shared_rel_pos", vocab_size=64, **kw):
    name, extra = BACKBONES[kind]
    return SplitMaskModel(name, vocab_size=vocab_size, img_size=32, drop_path_rate=0.0, **{**extra, **kw})


def _splits(n, generator):
    return torch.stack([generator() for _ in range(n)])


# --- the split -----------------------------------------------------------------------------------
@pytest.mark.parametrize("blockwise", [True, False])
def test_halves_are_disjoint_and_cover_every_patch(blockwise):
    generator = RandomSplitGenerator(14, min_num_patches=16, max_num_patches=75, blockwise=blockwise, seed=0)
    masks = _splits(200, generator)
    assert masks.shape == (200, 14, 14) and masks.dtype == torch.bool
    assert (masks.flatten(1).sum(1) == 98).all()  # half B: exactly 50% (section 5.5)
    idx_a, idx_b = split_indices(masks)
    assert idx_a.shape == idx_b.shape == (200, 98)
    both = torch.cat((idx_a, idx_b), 1).sort(1).values
    assert torch.equal(both, torch.arange(196).expand(200, -1))  # disjoint and covering
    assert torch.equal(masks.flatten(1).gather(1, idx_b), torch.ones(200, 98, dtype=torch.bool))
    assert len({m.numpy().tobytes() for m in masks}) == 200  # random, not one fixed split


def test_split_is_reproducible_from_the_seed_and_blockwise_splits_are_blocky():
    a, b = RandomSplitGenerator(14, seed=3), RandomSplitGenerator(14, seed=3)
    assert torch.equal(_splits(20, a), _splits(20, b))
    block, uniform = _splits(100, RandomSplitGenerator(14, seed=1)), _splits(100, RandomSplitGenerator(14, blockwise=False, seed=1))

    def same_neighbours(m):  # fraction of horizontally adjacent pairs in the same half
        return (m[:, :, 1:] == m[:, :, :-1]).float().mean().item()

    assert same_neighbours(block) > 0.75 > 0.55 > same_neighbours(uniform)  # blocks vs ~0.5 for uniform


def test_split_generator_and_data_module_errors_and_wiring():
    with pytest.raises(ValueError, match="both halves"):
        RandomSplitGenerator(4, num_masking_patches=16)
    data = BeitDataModule(mode="pretrain", masking="split", input_size=32, patch_size=8, tokenizer_size=32,
                          num_masking_patches=8, min_num_patches=2, max_num_patches=None, num_workers=0)
    assert isinstance(data.mask_generator, RandomSplitGenerator) and int(data.mask_generator().sum()) == 8
    with pytest.raises(ValueError, match="masking must be one of"):
        BeitDataModule(mode="pretrain", masking="blocks")
    with pytest.raises(ValueError, match="same number of patches"):
        split_indices(torch.tensor([[True, False, False, False], [True, True, False, False]]))


# --- the encoder sees one half only ------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_changing_half_b_does_not_change_the_encoding_of_half_a(kind):
    model = _model(kind).eval()
    mask = _splits(3, RandomSplitGenerator(4, seed=0))
    idx_a, idx_b = split_indices(mask)
    image = torch.randn(3, 3, 32, 32)
    pixel_mask = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]  # B patches in pixel space
    changed = torch.where(pixel_mask, torch.randn_like(image) * 3, image)
    with torch.no_grad():
        assert torch.equal(model.encode(image, idx_a), model.encode(changed, idx_a))
        assert not torch.allclose(model.encode(image, idx_b), model.encode(changed, idx_b), atol=1e-3)
        a_changed = torch.where(pixel_mask, image, torch.randn_like(image))
        assert not torch.allclose(model.encode(image, idx_a), model.encode(a_changed, idx_a), atol=1e-3)


def test_subset_encoding_equals_the_full_sequence_with_attention_restricted_to_the_subset():
    """The per-sample gathered relative position bias: a reference that never gathers (timm's blocks
    on all tokens, the other half hidden from attention by an additive -inf mask)."""
    model = _model("beit_shared_rel_pos").eval()
    with torch.no_grad():
        model.backbone.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)  # make the bias matter
    mask = _splits(2, RandomSplitGenerator(4, seed=5))
    idx_a, _ = split_indices(mask)
    image = torch.randn(2, 3, 32, 32)
    bb = model.backbone
    with torch.no_grad():
        ours = model.encode(image, idx_a)
        x = torch.cat((bb.cls_token.expand(2, -1, -1), bb.patch_embed(image)), 1)
        visible = torch.cat((torch.ones(2, 1, dtype=torch.bool), ~mask.flatten(1)), 1)
        hide = torch.zeros(2, 1, 1, 17).masked_fill(~visible[:, None, None, :], float("-inf"))
        bias = bb.rel_pos_bias()[None] + hide
        for block in bb.blocks:
            x = block(x, shared_rel_pos_bias=bias)
        reference = bb.norm(x)[visible].view(2, 1 + idx_a.shape[1], -1)
        assert torch.allclose(ours, reference, atol=1e-5)
        everything = torch.arange(16).expand(2, -1)
        assert torch.allclose(model.encode(image, everything), bb.forward_features(image), atol=1e-5)


def test_forward_has_beits_interface_and_matches_the_split_directions():
    model = _model().eval()
    mask = _splits(4, RandomSplitGenerator(4, seed=2))
    image = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_split(image, mask)
        logits = model(image, mask)
    assert logits.shape == (int(mask.sum()), 64) and torch.allclose(logits, out["logits_b"], atol=1e-5)
    assert out["logits_a"].shape == (int((~mask).sum()), 64) and out["pooled_a"].shape == (4, 64)
    with torch.no_grad():  # the B->A direction is the A->B direction of the complementary split
        assert torch.allclose(out["logits_a"], model(image, ~mask), atol=1e-5)
    uneven = _splits(4, RandomSplitGenerator(4, num_masking_patches=12, blockwise=False, seed=2))
    assert model.forward_split(image, uneven)["logits_a"].shape == (16, 64)  # 25% / 75% halves


def test_per_block_relative_position_tables_are_refused():
    with pytest.raises(ValueError, match="shared relative position bias"):
        _model(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    with pytest.raises(ValueError, match="XCiT"):
        SplitMaskModel("xcit_nano_12_p16_224")


# --- InfoNCE ---------------------------------------------------------------------------------------
def test_info_nce_equals_its_closed_form_on_a_hand_built_batch():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    t = 0.5
    na = [[x / math.hypot(*v) for x in v] for v in a.tolist()]
    nb = [[x / math.hypot(*v) for x in v] for v in b.tolist()]

    def closed_form(q, k, offset=0):  # mean over i of -log(exp(q_i.k_{offset+i} / t) / sum_j exp(q_i.k_j / t))
        total = 0.0
        for i, qi in enumerate(q):
            s = [sum(x * y for x, y in zip(qi, kj, strict=True)) / t for kj in k]
            total += -s[offset + i] + math.log(sum(math.exp(v) for v in s))
        return total / len(q)

    assert info_nce(a, b, t).item() == pytest.approx(closed_form(na, nb), rel=1e-6)
    task = SplitMaskPretraining(_model(), ColourTokenizer(), temperature=t)
    expected = 0.5 * (closed_form(na, nb) + closed_form(nb, na))
    assert task.contrastive(a, b).item() == pytest.approx(expected, rel=1e-6)
    # keys gathered from other devices: the query's positive sits at its global index
    others = [[0.0, -1.0], [0.8, -0.6]]
    assert info_nce(a, torch.tensor(others + b.tolist()), t, offset=2).item() == pytest.approx(
        closed_form(na, others + nb, offset=2), rel=1e-6)


# --- learning --------------------------------------------------------------------------------------
class FixedSplitBatches(Dataset):
    """Fixed generated samples and splits, so that loss changes come from learning."""

    def __init__(self, n=16, seed=0):
        images = GeneratedImages(n, image_size=32)
        transform = BeitPretrainTransform(32, 32, RandomSplitGenerator(4, min_num_patches=2, seed=seed), scale=(0.4, 1.0))
        torch.manual_seed(seed)
        self.samples = [transform(images[i][0]) for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _fit(tmp_path, task, data, max_steps=40):
    pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, gradient_clip_val=3.0, default_root_dir=tmp_path).fit(
        task, DataLoader(data, batch_size=8, shuffle=True))


def _evaluate(task, batch):
    task.eval()
    with torch.no_grad():
        step = task._split_step(batch)
    accuracy = (step["logits"].argmax(-1) == step["targets"]).float().mean().item()
    return step["mim"].item(), step["nce"].item(), accuracy, step["targets"]


@pytest.mark.parametrize("seed", [0])
def test_a_tiny_run_lowers_the_loss_and_beats_chance_on_token_accuracy(tmp_path, seed):
    pl.seed_everything(seed)
    data = FixedSplitBatches(seed=seed)
    batch = next(iter(DataLoader(data, batch_size=16)))
    task = SplitMaskPretraining(_model(), ColourTokenizer(), lr=3e-3, min_lr=1e-4, warmup_steps=4, weight_decay=0.05)
    mim0, nce0, _, targets = _evaluate(task, batch)
    assert mim0 == pytest.approx(math.log(64), abs=0.3)  # an untrained model is near chance
    _fit(tmp_path, task, data)
    mim1, nce1, accuracy, _ = _evaluate(task, batch)
    counts = torch.bincount(targets, minlength=64).float()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = -(p * p.log()).sum().item()  # the loss of predicting token frequencies
    majority = p.max().item()  # the accuracy of always predicting the most frequent token
    # measured over seeds 0, 1, 2: mim 4.17 -> 2.38 / 2.68 / 2.54 (unigram entropy 3.25 / 3.50 / 3.45), token
    # accuracy 0.42 / 0.39 / 0.41 (majority 0.08 / 0.09 / 0.06), InfoNCE 1.71 -> 0.67 / 1.47 -> 0.61 / 1.46 -> 0.58
    assert mim1 < unigram_entropy - 0.3 < mim0
    assert accuracy > majority + 0.2
    assert nce1 < 0.6 * nce0


# --- checkpoints: the encoder loads like a BEiT pre-training checkpoint -------------------------------
@pytest.mark.parametrize("position", ["shared_rel_pos", "abs_pos"])
def test_a_splitmask_checkpoint_loads_into_classifier_probe_and_segmenter(tmp_path, position):
    depth4 = dict(arch=dict(depth=4))
    extra = {**depth4, **(ABS_POS if position == "abs_pos" else {})}
    task = SplitMaskPretraining(SplitMaskModel(MICRO, vocab_size=64, img_size=32, **extra), ColourTokenizer(),
                                warmup_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(FixedSplitBatches(8), batch_size=8))
    path = tmp_path / "splitmask.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("tokenizer.")]
    assert any(k.startswith("model.lm_head.blocks.") for k in state)  # the decoder is kept for resuming
    # fine-tuning arch: per-block relative position tables (filled from the shared one), or absolute positions
    arch = dict(depth=4, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1) if position == "shared_rel_pos" \
        else dict(depth=4, use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=0.1)
    for num_classes in (10, 0):  # fine-tuning; the linear probe's feature extractor
        classifier = create_classifier(MICRO, num_classes, img_size=32, arch=arch)
        result = load_checkpoint(classifier, path)  # strict: raises on any missing backbone key
        assert not result.missing and not result.unexpected and not result.mismatched
        assert any(k.startswith("lm_head.blocks.") for k in result.dropped) and "lm_head.mask_token" in result.dropped
        encoder = task.model.backbone.state_dict()
        assert torch.equal(classifier.patch_embed.proj.weight, encoder["patch_embed.proj.weight"])
        assert torch.equal(classifier.blocks[3].mlp.fc2.weight, encoder["blocks.3.mlp.fc2.weight"])
    segmenter = create_segmenter(MICRO, 7, img_size=64, out_indices=[0, 1, 2, 3], channels=32, arch=arch)
    result = load_checkpoint(segmenter, path)
    assert not result.missing and torch.equal(segmenter.backbone.blocks[0].attn.qkv.weight, encoder["blocks.0.attn.qkv.weight"])
    # and the Lightning checkpoint resumes into the task with its decoder
    restored = SplitMaskPretraining.load_from_checkpoint(path, model=SplitMaskModel(MICRO, vocab_size=64, img_size=32, **extra),
                                                         tokenizer=ColourTokenizer())
    assert torch.equal(restored.model.lm_head.pos_embed, task.model.lm_head.pos_embed)
    assert restored.hparams.temperature == 0.2


def test_init_checkpoint_into_splitmask_and_between_pretraining_methods():
    """``init_checkpoint=`` of a ``task=splitmask`` run: a SplitMask state loads whole (decoder
    included); a BEiT MIM state gives the encoder and a fresh decoder, and the reverse."""
    from beit_lightning.models import BeitForMaskedImageModeling

    source = _model()
    target = _model()
    result = load_checkpoint(target, {"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}})
    assert not result.missing and not result.initialised and not result.dropped
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())

    beit = BeitForMaskedImageModeling(MICRO, vocab_size=64, img_size=32)
    result = load_checkpoint(target, beit.state_dict())
    assert not result.missing and not result.unexpected
    assert "lm_head.weight (the head of another pre-training method)" in result.dropped
    assert result.initialised and all(k.startswith("lm_head.") for k in result.initialised)
    assert torch.equal(target.backbone.blocks[1].attn.qkv.weight, beit.backbone.blocks[1].attn.qkv.weight)

    result = load_checkpoint(beit, source.state_dict())  # the reverse: SplitMask encoder into BEiT MIM
    assert not result.missing and not result.unexpected
    assert set(result.initialised) >= {"lm_head.weight", "mask_token"}
    assert torch.equal(beit.backbone.blocks[0].mlp.fc1.weight, source.backbone.blocks[0].mlp.fc1.weight)


def test_the_encoder_exports_to_timm_like_a_beit_encoder(tmp_path):
    """``export_timm`` of a SplitMask model (BEiT encoder) and of its Lightning checkpoint: timm loads
    the file with no missing key, and its features equal the encoder's on all patches."""
    import timm

    from beit_lightning.checkpoints import export_timm

    torch.manual_seed(0)
    model = _model().eval()
    path = tmp_path / "splitmask_timm.pth"
    export_timm(model, path)
    timm_model = timm.create_model(MICRO, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0,
                                   img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    final_norm, model.backbone.norm = model.backbone.norm, nn.Identity()  # timm's pooled model: norm -> fc_norm
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(x), model.backbone.forward_features(x), atol=1e-5, rtol=1e-4)
    assert torch.equal(timm_model.fc_norm.weight, final_norm.weight)
    export_timm({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "from_ckpt.pth",
                model_name=MICRO, img_size=32)
    assert torch.load(tmp_path / "from_ckpt.pth", weights_only=True).keys() == torch.load(path, weights_only=True).keys()


DDP_SCRIPT = """
import sys
import pytorch_lightning as pl
import torch
sys.path.insert(0, sys.argv[2])  # the tests folder: conftest's ColourTokenizer, this file's FixedSplitBatches
from conftest import ColourTokenizer
from test_splitmask import FixedSplitBatches
from beit_lightning.models import SplitMaskModel
from beit_lightning.strategies import end_distributed
from beit_lightning.tasks import SplitMaskPretraining
from torch.utils.data import DataLoader

class RecordGradients(SplitMaskPretraining):
    def on_after_backward(self):  # DDP has averaged the gradients over the ranks here
        if self.global_step == 0 and self.trainer.is_global_zero:
            torch.save({k: p.grad.clone() for k, p in self.named_parameters() if p.grad is not None}, sys.argv[1] + ".grads")

torch.manual_seed(0)
task = RecordGradients(SplitMaskModel("beit_lightning_micro_patch8_32", vocab_size=64, img_size=32, drop_path_rate=0.0),
                       ColourTokenizer(), warmup_steps=1, check_finite_loss=False)
if int(__import__("os").environ.get("LOCAL_RANK", 0)) == 0:
    torch.save(task.state_dict(), sys.argv[1] + ".init")
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
trainer.fit(task, DataLoader(FixedSplitBatches(8), batch_size=4, shuffle=False))
end_distributed()
"""


@pytest.mark.slow
def test_negatives_gathered_over_two_ddp_processes_give_the_gradients_of_the_whole_batch(tmp_path):
    """Two CPU processes of 4 images each, negatives gathered across them with gradients
    (``all_gather(sync_grads=True)``): DDP's averaged gradients equal those of one process on all 8
    images, whose InfoNCE has every other image as a negative. Without the gradient through the
    gathered keys, or with the wrong positive offset, they differ."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_splitmask.py"
    script.write_text(DDP_SCRIPT)
    out = str(tmp_path / "run")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), out, str(Path(__file__).parent)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp_grads = torch.load(out + ".grads", weights_only=True)

    task = SplitMaskPretraining(SplitMaskModel(MICRO, vocab_size=64, img_size=32, drop_path_rate=0.0), ColourTokenizer())
    task.load_state_dict(torch.load(out + ".init", weights_only=True))
    batch = next(iter(DataLoader(FixedSplitBatches(8), batch_size=8)))  # the two ranks' images together
    task.train()
    task._split_step(batch)["loss"].backward()
    grads = {k: p.grad for k, p in task.named_parameters() if p.grad is not None}
    assert set(grads) == set(ddp_grads)
    for key, grad in grads.items():
        torch.testing.assert_close(ddp_grads[key], grad, atol=2e-5, rtol=1e-3, msg=key)


# --- the shipped configs ---------------------------------------------------------------------------
def _compose(overrides):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_paper_experiment_values():
    cfg = _compose(["experiment=splitmask_ade20k", "output_dir=/tmp/x", "data.root=/data/ADEChallengeData2016/images"])
    assert cfg.task._target_ == "beit_lightning.tasks.SplitMaskPretraining"
    assert (cfg.task.model.decoder_depth, cfg.task.temperature, cfg.trainer.max_epochs) == (2, 0.2, 21000)
    assert (cfg.data.masking, cfg.data.num_masking_patches, cfg.data.min_num_patches, cfg.data.max_num_patches) == ("split", 98, 16, 75)
    assert list(cfg.data.scale) == [0.08, 0.25]
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 2048
    with torch.device("meta"):
        model = instantiate(cfg.task.model)
    assert model.backbone.pos_embed is not None and model.backbone.rel_pos_bias is None  # absolute positions (4.2)
    assert len(model.lm_head.blocks) == 2 and model.patch_grid == (14, 14)


@pytest.mark.slow
def test_smoke_experiment_runs_through_the_cli(tmp_path):
    from beit_lightning.cli import train

    cfg = _compose(["experiment=smoke_splitmask", f"output_dir={tmp_path}", "trainer.max_epochs=1", "data.num_train=64",
                    "data.num_val=32", "trainer.enable_progress_bar=false", "logger=csv"])
    metric = train(cfg)
    assert math.isfinite(metric) and metric < math.log(512) + math.log(32)  # MIM + InfoNCE, below chance
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # the run's encoder fine-tunes with the model config unchanged (BEiT's per-block tables from the shared one)
    classifier = create_classifier(cfg.model.name, 10, img_size=cfg.model.img_size, arch=dict(cfg.model.arch))
    result = load_checkpoint(classifier, tmp_path / "checkpoints" / "last.ckpt")
    assert result.source == "lightning" and not result.missing and not result.unexpected
