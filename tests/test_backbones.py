"""Every supported timm backbone family (BEiT, ViT / DeiT, XCiT) in every task: layer ids for layer-wise
lr decay on the real models' parameter names (meta device), what the linear probe reads, masked image
modeling over a ViT and an XCiT, and a tiny model of each family fine-tuned, probed and pre-trained on
the generated data."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from beit_lightning.checkpoints import load_checkpoint
from beit_lightning.cli import train, validate_config
from beit_lightning.data import GeneratedDataModule
from beit_lightning.models import BeitForMaskedImageModeling, backbone_family, create_classifier
from beit_lightning.models.backbones import layer_ids, probe_dims, probe_features
from beit_lightning.optim import layer_decay_param_groups
from beit_lightning.tasks import ImageClassification, LinearProbe, MaskedImageModeling
from conftest import ColourTokenizer, last_logged

CONF = Path(__file__).parents[1] / "conf"
#: the backbone model groups (the ViTGAN groups serve task=gan only: tests/test_recipes.py, test_vitgan.py)
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("vitgan"))
#: tiny models of each family: 32px, 8px patches (a 4x4 grid), 2 blocks
TINY = {
    "vit": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "xcit": ("xcit_nano_12_p8_224", dict(embed_dim=32, depth=2, num_heads=2)),
}


def _compose(overrides):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "output_dir=/tmp/x"])


def _scales(model, decay=0.5, **kw):
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=decay, **kw)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)
    return {n: scale[id(p)] for n, p in named.items()}, {n: wd[id(p)] for n, p in named.items()}


# --- layer ids on real-size models (no weights: the meta device) ---------------------------------

def test_layer_decay_of_a_distilled_deit_puts_the_distillation_token_in_the_embedding():
    with torch.device("meta"):
        model = timm.create_model("deit_base_distilled_patch16_224", num_classes=1000)
    scale, wd = _scales(model, 0.65)
    for name in ("cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert scale[name] == pytest.approx(0.65**13), name  # layer 0 of 13 (12 blocks + 1)
    for i in (0, 5, 11):
        for name in (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.norm1.weight", f"blocks.{i}.mlp.fc2.bias"):
            assert scale[name] == pytest.approx(0.65 ** (12 - i)), name
    for name in ("norm.weight", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        assert scale[name] == 1.0, name  # BEiT's rule: the final norm with the heads (timm merges it into block 11)
    # weight decay as DeiT's timm optimizer: no decay for 1-d, biases, pos_embed, cls_token, dist_token
    assert {n for n, v in wd.items() if v == 0 and model.get_parameter(n).ndim > 1} == {"cls_token", "dist_token", "pos_embed"}


def test_layer_decay_of_xcit_numbers_the_class_attention_blocks_after_the_patch_blocks():
    with torch.device("meta"):
        model = timm.create_model("xcit_small_12_p16_224", num_classes=1000)
    ids, top = layer_ids(model)
    assert top == 12 + 2 + 1
    scale, _ = _scales(model, 0.5)
    stem = ["cls_token", "pos_embed.token_projection.weight", "patch_embed.proj.0.0.weight", "patch_embed.proj.0.1.weight",
            "patch_embed.proj.6.1.bias"]  # the convolutional stem with its BatchNorms, the Fourier encoding's projection
    assert all(ids[n] == 0 and scale[n] == 0.5**15 for n in stem)
    for i in (0, 11):
        for name in (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.temperature", f"blocks.{i}.local_mp.bn.weight",
                     f"blocks.{i}.gamma3"):
            assert ids[name] == i + 1 and scale[name] == pytest.approx(0.5 ** (14 - i)), name
    for j in (0, 1):
        for name in (f"cls_attn_blocks.{j}.attn.q.weight", f"cls_attn_blocks.{j}.mlp.fc1.weight", f"cls_attn_blocks.{j}.gamma2"):
            assert ids[name] == 13 + j and scale[name] == pytest.approx(0.5 ** (2 - j)), name
    assert scale["norm.weight"] == scale["head.weight"] == 1.0
    with torch.device("meta"):
        deep = timm.create_model("xcit_medium_24_p8_224")
    assert layer_ids(deep)[1] == 24 + 2 + 1


def test_layer_ids_of_a_vit_and_of_beit_follow_the_official_rule():
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224")
        beit = timm.create_model("beit_base_patch16_224")
    ids, top = layer_ids(vit)
    assert top == 13 and ids["cls_token"] == ids["pos_embed"] == 0 and ids["blocks.3.attn.proj.weight"] == 4
    assert ids["norm.weight"] == ids["head.weight"] == top
    ids, top = layer_ids(beit)  # get_num_layer_for_vit of beit/optim_factory.py
    assert ids["cls_token"] == 0 and ids["blocks.11.attn.relative_position_bias_table"] == 12 and ids["fc_norm.weight"] == 13


# --- what the linear probe reads ----------------------------------------------------------------------

def _tiny(family, num_classes=0, **kw):
    name, arch = TINY[family]
    return create_classifier(name, num_classes, img_size=32, arch={**arch, **kw})


def test_probe_of_a_distilled_deit_reads_the_class_token_and_the_patches_not_the_distillation_token():
    model = _tiny("deit_distilled").eval()
    images = torch.randn(2, 3, 32, 32)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    (feat,) = probe_features(model, images, [0])
    out = seen["out"]  # B x (2 + 16) x D: class, distillation, patches
    assert model.num_prefix_tokens == 2 and out.shape[1] == 18
    torch.testing.assert_close(feat, torch.cat([out[:, 0], out[:, 2:].mean(1)], dim=-1))
    assert probe_dims(model, [0, 1]) == [64, 64]


def test_probe_of_xcit_reads_patch_blocks_then_class_attention_blocks():
    model = _tiny("xcit").eval()
    images = torch.randn(2, 3, 32, 32)
    layers = [0, 1, 2, 3]  # 2 XCA blocks, then the 2 class-attention blocks
    feats = probe_features(model, images, layers)
    assert [f.shape[-1] for f in feats] == probe_dims(model, layers) == [32, 32, 64, 64]
    with torch.no_grad():
        tokens = model.forward_features(images)  # after both class-attention blocks and the final norm
    torch.testing.assert_close(model.norm(feats[3][:, :32]), tokens[:, 0])  # the class token of the last block
    probe = LinearProbe(model, num_classes=5, lr_base_batch=None)
    assert probe.blocks == layers and [h.in_features for h in probe.heads] == [32, 32, 64, 64]


# --- masked image modeling over a ViT, a distilled DeiT and an XCiT --------------------------------

@pytest.mark.parametrize("family", ["vit", "deit_distilled", "xcit"])
def test_masked_patches_cannot_see_their_pixels(family):
    name, arch = TINY[family]
    model = BeitForMaskedImageModeling(name, vocab_size=30, img_size=32, **arch).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    altered = images.clone()
    altered[:, :, 8:24, 8:24] = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(images, mask)
        assert logits.shape == (8, 30)
        # XCiT's 3x3 convolutional stem overlaps patches: masked pixels are blanked before it
        torch.testing.assert_close(model(altered, mask), logits)
        assert not torch.allclose(model(altered, ~mask), model(images, ~mask))


def test_mim_model_interface_per_family():
    vit = BeitForMaskedImageModeling(TINY["deit_distilled"][0], vocab_size=30, img_size=32, **TINY["deit_distilled"][1])
    xcit = BeitForMaskedImageModeling(TINY["xcit"][0], vocab_size=30, img_size=32, init_values=0.5, **TINY["xcit"][1])
    assert (vit.family, vit.num_prefix_tokens, vit.patch_grid, vit.patch_size) == ("vit", 2, (4, 4), 8)
    assert (xcit.family, xcit.num_prefix_tokens, xcit.patch_grid, xcit.patch_size) == ("xcit", 0, (4, 4), 8)
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.dist_token"} <= vit.no_weight_decay()
    # XCiT: the layer-scale value reaches timm's eta; no class-attention stage in pre-training
    assert torch.all(xcit.backbone.blocks[0].gamma1 == 0.5)
    assert xcit.backbone.cls_attn_blocks is None and not any(k.startswith("backbone.cls_") for k in xcit.state_dict())
    # BEiT's initialisation on the ViT: truncated at +-std, proj/fc2 of block l rescaled by sqrt(2 l)
    fc1 = vit.backbone.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= 0.02 + 1e-7
    assert vit.backbone.blocks[1].mlp.fc2.weight.abs().max() <= 0.02 / 2 + 1e-7
    assert vit.backbone.dist_token.abs().max() <= 0.02 and vit.backbone.dist_token.std() > 0.005


def test_pretrained_vit_and_xcit_load_into_classifiers():
    for family, fresh in (("deit_distilled", {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}),
                          ("xcit", {"head.weight", "head.bias", "cls_token"})):
        name, arch = TINY[family]
        mim = BeitForMaskedImageModeling(name, vocab_size=30, img_size=32, **arch)
        classifier = create_classifier(name, 7, img_size=32, arch=arch)
        result = load_checkpoint(classifier, {"state_dict": {f"model.{k}": v for k, v in mim.state_dict().items()}})
        assert not result.missing and not result.unexpected, result.report()
        assert {k for k in result.initialised if not k.startswith("cls_attn_blocks.")} == fresh
        torch.testing.assert_close(classifier.blocks[1].mlp.fc2.weight, mim.backbone.blocks[1].mlp.fc2.weight)
        # the other way: a classifier's weights continue pre-training (heads dropped)
        again = BeitForMaskedImageModeling(name, vocab_size=30, img_size=32, **arch)
        result = load_checkpoint(again, {"state_dict": {f"model.{k}": v for k, v in mim.state_dict().items()}})
        assert not result.missing and not result.unexpected


def test_a_vit_checkpoint_at_another_size_resamples_its_position_embedding():
    name, arch = TINY["vit"]
    small = create_classifier(name, 3, img_size=32, arch=arch)
    large = create_classifier(name, 3, img_size=48, arch=arch)
    result = load_checkpoint(large, small.state_dict())
    assert not result.missing and large.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(large.pos_embed[:, 0], small.pos_embed[:, 0])  # the class token's entry is kept


# --- the configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_builds_for_every_task(model):
    expected = {"beit": "Beit", "deit": "VisionTransformer", "vit": "VisionTransformer", "xcit": "Xcit"}[model.split("_")[0]]
    for task in ("finetune", "linear_probe", "pretrain"):
        grid_view = ["data.tokenizer_size='${bl.mul:${bl.patch_grid:${model.img_size},${model.patch_size}},8}'"]
        cfg = _compose([f"task={task}", f"model={model}", *(grid_view if task == "pretrain" else [])])
        validate_config(cfg)
        with torch.device("meta"):
            net = instantiate(cfg.task.model)
        backbone = getattr(net, "backbone", net)
        assert expected in type(backbone).__name__ and backbone_family(backbone) == model.split("_")[0].replace("deit", "vit")
        assert backbone.patch_embed.img_size[0] == cfg.model.img_size
        if task != "linear_probe":  # BatchNorm in XCiT: synced under DDP
            assert cfg.trainer.sync_batchnorm is model.startswith("xcit")


def test_a_model_on_the_command_line_replaces_the_smoke_experiments_and_its_masks_follow_the_grid():
    """Hydra: a command-line group choice wins over the experiment's `override /model`; the experiment's
    values (64px) still apply, and the tokenizer view and mask count follow the model's patch grid."""
    for overrides, grid in ((["experiment=smoke"], 8), (["task=pretrain", "model=xcit_nano", "experiment=smoke"], 4),
                            (["model=vit_small", "experiment=smoke"], 4), (["experiment=smoke", "model=xcit_micro"], 8)):
        cfg = _compose(overrides)
        validate_config(cfg)
        assert cfg.model.img_size == 64 and cfg.data.input_size == 64
        assert cfg.data.tokenizer_size == cfg.tokenizer.image_size == 8 * grid
        assert cfg.data.num_masking_patches == round(0.4 * grid * grid)  # 26 of 64, 6 of 16
        with torch.device("meta"):
            model = instantiate(cfg.task.model)
        assert model.patch_grid == (grid, grid)
    assert _compose(["task=pretrain", "model=xcit_nano", "experiment=smoke"]).model.name == "xcit_nano_12_p16_224"


# --- a tiny model of each family fine-tunes, probes and pre-trains on the generated data ---------------

def _data(tmp_path, mode):
    return GeneratedDataModule(mode=mode, num_train=32, num_val=16, image_size=32, input_size=32, tokenizer_size=32,
                               patch_size=8, num_masking_patches=6, min_num_patches=2, batch_size=16, num_workers=0,
                               scale=(0.6, 1.0), auto_augment=None, reprob=0.0, crop_pct=1.0, cache_dir=str(tmp_path),
                               samples_per_shard=16)


def _fit(task, dm, tmp_path):
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, dm)
    return trainer


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "xcit"])
def test_tiny_model_fine_tunes_probes_and_pretrains(family, tmp_path):
    name, arch = TINY[family]
    # fine-tuning with layer-wise decay
    model = _tiny(family, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _fit(ImageClassification(model, 10, lr=1e-3, warmup_steps=1, layer_decay=0.75, mixup=0.0, cutmix=0.0),
                   _data(tmp_path, "finetune"), tmp_path)
    assert {"train/loss", "val/acc1"} <= set(trainer.callback_metrics)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.0.") for k in changed) and any(k.startswith("head") for k in changed)
    scales = {g["lr_scale"] for g in trainer.optimizers[0].param_groups}
    assert min(scales) == pytest.approx(0.75 ** (len(model.blocks) + (2 if family == "xcit" else 0) + 1))
    # linear probe of every layer, encoder frozen
    encoder = _tiny(family)
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    probe = LinearProbe(encoder, num_classes=10, lr=1e-2, lr_base_batch=None)
    trainer = _fit(probe, _data(tmp_path, "finetune"), tmp_path)
    assert all(torch.equal(frozen[k], v) for k, v in encoder.state_dict().items())  # BatchNorm statistics included
    assert {f"val/acc1_block{b}" for b in probe.blocks} <= set(trainer.callback_metrics)
    # masked image modeling
    mim = BeitForMaskedImageModeling(name, vocab_size=64, img_size=32, **arch)
    task = MaskedImageModeling(mim, ColourTokenizer(), lr=1e-3, warmup_steps=1)
    trainer = _fit(task, _data(tmp_path, "pretrain"), tmp_path)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/mlm_acc" in trainer.callback_metrics


@pytest.mark.slow
@pytest.mark.parametrize("model", ["xcit_nano", "vit_small"])
def test_issue_commands_pretrain_a_timm_backbone_with_the_smoke_experiment(model, tmp_path):
    """`beit-lightning task=pretrain model=xcit_nano experiment=smoke` (and a ViT), on fewer images."""
    metric = train(compose_run(["task=pretrain", f"model={model}", "experiment=smoke", "data.num_train=64",
                                "data.num_val=32", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                                "logger=csv"], tmp_path))
    assert metric == pytest.approx(last_logged(tmp_path / "csv" / "metrics.csv", "val/loss"), rel=1e-6)
    model_ = instantiate(compose_run(["task=pretrain", f"model={model}", "experiment=smoke"], tmp_path).task.model)
    assert not load_checkpoint(model_, tmp_path / "checkpoints" / "last.ckpt").missing


def compose_run(overrides, output_dir):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"output_dir={output_dir}"])
