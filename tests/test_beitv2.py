"""BEiT v2: the patch-aggregation head and its loss against an independent re-computation from the
official checkpoint layout (beit2/modeling_pretrain.py VisionTransformerForMaskedImageModelingCLS),
the released v2 files' layouts loading with every key used or explained, and export to timm's beitv2."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from beit_lightning.beitv2_checkpoints import load_beitv2_checkpoint
from beit_lightning.checkpoints import CheckpointMismatchError, export_timm, load_checkpoint
from beit_lightning.models.beitv2 import BeitV2ForMaskedImageModeling
from beit_lightning.tasks import MaskedImageModelingV2
from conftest import ColourTokenizer, micro_model
from reference_beit import (
    layer_norm,
    random_official_finetuned_state_dict,
    random_official_state_dict,
    reference_classifier_logits,
    relative_position_index,
)

D, HEADS, PATCH, GRID, VOCAB = 64, 2, 8, 4, 64  # the micro BEiT: 32px images, a 4x4 grid


def _v2_model(early_layers=1, head_layers=2, shared_lm_head=True, **kw):
    return BeitV2ForMaskedImageModeling("beit_lightning_micro_patch8_32", vocab_size=VOCAB, img_size=32,
                                        early_layers=early_layers, head_layers=head_layers,
                                        shared_lm_head=shared_lm_head, **kw)


def official_v2_state_dict(head_layers=2, shared_lm_head=True, depth=2, seed=0):
    """A v2 pre-training checkpoint in the official layout: v1's keys plus ``cls_pt_layers.N.*``
    (blocks of modeling_finetune.Block without their own position table), and with
    ``shared_lm_head=False`` ``cls_pt_norm.*`` / ``cls_pt_lm_head.*``."""
    sd = random_official_state_dict(D, depth, HEADS, PATCH, GRID, VOCAB, seed=seed)
    head = random_official_state_dict(D, head_layers, HEADS, PATCH, GRID, VOCAB, seed=seed + 1)
    for key, value in head.items():
        if key.startswith("blocks."):
            sd["cls_pt_layers." + key[len("blocks."):]] = value
    if not shared_lm_head:
        sd["cls_pt_norm.weight"], sd["cls_pt_norm.bias"] = head["norm.weight"], head["norm.bias"]
        sd["cls_pt_lm_head.weight"], sd["cls_pt_lm_head.bias"] = head["lm_head.weight"], head["lm_head.bias"]
    return sd


def _block(sd, p, x, bias):
    """One official BEiT block (pre-norm attention with q/v biases and layer scale), explicit."""
    b, n, d = x.shape
    hd = d // HEADS
    y = layer_norm(x, sd, f"{p}.norm1")
    qkv_bias = torch.cat([sd[f"{p}.attn.q_bias"], torch.zeros_like(sd[f"{p}.attn.q_bias"]), sd[f"{p}.attn.v_bias"]])
    q, k, v = (y @ sd[f"{p}.attn.qkv.weight"].T + qkv_bias).reshape(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
    y = (((q / math.sqrt(hd)) @ k.transpose(-1, -2) + bias).softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + sd[f"{p}.gamma_1"] * (y @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"])
    y = F.gelu(layer_norm(x, sd, f"{p}.norm2") @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"])
    return x + sd[f"{p}.gamma_2"] * (y @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"])


def reference_v2(sd, images, mask, early_layers, shared_lm_head=True):
    """(logits, aggregation logits) at masked patches, and the last layer's tokens before the norm,
    re-computed from an official v2 state dict as ``VisionTransformerForMaskedImageModelingCLS``."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    b, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    m = mask.reshape(b, h * w, 1).float()
    x = torch.cat([sd["cls_token"].expand(b, 1, d), x * (1 - m) + sd["mask_token"] * m], dim=1)
    table = sd["rel_pos_bias.relative_position_bias_table"]
    bias = table[relative_position_index(h, w).reshape(-1)].reshape(h * w + 1, h * w + 1, HEADS).permute(2, 0, 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        x = _block(sd, f"blocks.{i}", x, bias)
        if i + 1 == early_layers:
            early = x[:, 1:]
    y = torch.cat([x[:, :1], early], dim=1)
    for j in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("cls_pt_layers."))):
        y = _block(sd, f"cls_pt_layers.{j}", y, bias)
    rows = mask.reshape(b, -1)
    main = layer_norm(x, sd, "norm")[:, 1:][rows] @ sd["lm_head.weight"].T + sd["lm_head.bias"]
    if shared_lm_head:
        agg = layer_norm(y, sd, "norm")[:, 1:][rows] @ sd["lm_head.weight"].T + sd["lm_head.bias"]
    else:
        agg = layer_norm(y, sd, "cls_pt_norm")[:, 1:][rows] @ sd["cls_pt_lm_head.weight"].T + sd["cls_pt_lm_head.bias"]
    return main, agg, x


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    mask = torch.rand(batch, GRID, GRID, generator=g) < 0.4
    mask[:, 0, 0] = True
    return images, mask


@pytest.mark.parametrize("shared_lm_head", [True, False])
def test_official_v2_pretraining_layout_loads_every_key_and_matches_the_reference(shared_lm_head):
    sd = official_v2_state_dict(shared_lm_head=shared_lm_head)
    model = _v2_model(shared_lm_head=shared_lm_head).eval()
    result = load_beitv2_checkpoint(model, {"model": sd, "epoch": 1599})
    assert result.source == "official" and not (result.missing or result.unexpected or result.mismatched)
    assert result.dropped == []  # only the derived relative_position_index buffer is not a parameter
    images, mask = _inputs()
    main, agg, _ = reference_v2(sd, images, mask, early_layers=1, shared_lm_head=shared_lm_head)
    with torch.no_grad():
        logits, aggregation = model.forward_with_aggregation(images, mask)
        plain = model(images, mask)
        gathered = model.forward_with_aggregation(images, torch.ones_like(mask), num_masked=GRID * GRID)
    torch.testing.assert_close(logits, main, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(aggregation, agg, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, logits)  # forward is v1's: the backbone's logits
    full = reference_v2(sd, images, torch.ones_like(mask), early_layers=1, shared_lm_head=shared_lm_head)
    torch.testing.assert_close(gathered[1], full[1], atol=1e-4, rtol=1e-4)  # the host-sync-free gather


def test_the_head_reads_the_last_cls_token_and_the_early_patch_tokens():
    """Zeroing the late block's residual branches (layer scale 0) leaves the early patch tokens equal
    to the last ones: the aggregation logits then depend on the late block only through the cls token."""
    sd = official_v2_state_dict(depth=2)
    images, mask = _inputs()
    main, agg, _ = reference_v2(sd, images, mask, early_layers=1)
    sd2 = dict(sd)
    sd2["blocks.1.gamma_1"] = torch.zeros(D)
    sd2["blocks.1.gamma_2"] = torch.zeros(D)
    model = _v2_model().eval()
    load_beitv2_checkpoint(model, {"model": sd2})
    with torch.no_grad():
        _, agg_early = model.forward_with_aggregation(images, mask)
    ref_last = reference_v2(sd2, images, mask, early_layers=2)[1]  # early = last layer: the same input
    torch.testing.assert_close(agg_early, ref_last, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(agg_early, agg, atol=1e-3)  # and the late block does matter in general


def test_combined_loss_is_the_sum_of_both_cross_entropies_by_hand():
    sd = official_v2_state_dict()
    model = _v2_model()
    load_beitv2_checkpoint(model, {"model": sd})
    tokenizer = ColourTokenizer(image_size=32)
    task = MaskedImageModelingV2(model, tokenizer, check_finite_loss=False).eval()
    images, mask = _inputs(batch=3, seed=5)
    tokenizer_image = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    batch = {"image": images, "tokenizer_image": tokenizer_image, "mask": mask}
    with torch.no_grad():
        loss, logits, targets = task._step(batch)
    codes = tokenizer.encode(tokenizer_image)[mask]
    main, agg, _ = reference_v2(sd, images, mask, early_layers=1)

    def cross_entropy(z, t):  # -log softmax(z)[t], averaged over the masked patches
        return (torch.logsumexp(z, -1) - z.gather(1, t[:, None])[:, 0]).mean()

    expected = cross_entropy(main, codes) + cross_entropy(agg, codes)
    assert torch.equal(targets, codes)
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, main, atol=1e-4, rtol=1e-4)
    assert cross_entropy(agg, codes) > 0.1 * expected  # both terms count


def test_gradients_reach_the_head_and_the_backbone_and_the_task_needs_the_v2_model():
    model = _v2_model(early_layers=1, head_layers=1)
    task = MaskedImageModelingV2(model, ColourTokenizer(image_size=32))
    images, mask = _inputs()
    batch = {"image": images, "tokenizer_image": torch.rand(2, 3, 32, 32), "mask": mask}
    task._step(batch)[0].backward()
    assert model.cls_pt_layers[0].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[1].attn.qkv.weight.grad.abs().sum() > 0  # through the last cls token
    with pytest.raises(TypeError, match="task=pretrain_v2"):
        MaskedImageModelingV2(micro_model(vocab_size=64), ColourTokenizer(image_size=32))
    with pytest.raises(ValueError, match="early_layers must be between 1 and depth - 1 = 1"):
        _v2_model(early_layers=2)


def test_head_initialisation_and_drop_path_follow_the_official_code():
    model = BeitV2ForMaskedImageModeling("beit_lightning_micro_patch8_32", vocab_size=VOCAB, img_size=32,
                                         early_layers=1, head_layers=2, drop_path_rate=0.3)
    rates = [float(b.drop_path1.drop_prob) for b in model.cls_pt_layers]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 3)[1:3].tolist())  # linspace(0, dpr, max(2, 1 + 2))[1:3]
    for i, block in enumerate(model.cls_pt_layers):
        assert torch.equal(block.attn.q_bias, torch.zeros(D)) and torch.equal(block.gamma_1, torch.full((D,), 0.1))
        # PyTorch's default Linear init (bound 1/sqrt(fan_in)), proj and fc2 divided by sqrt(2 (early + i + 1))
        bound = 1 / math.sqrt(D) / math.sqrt(2 * (1 + i + 1))
        assert block.attn.proj.weight.abs().max() <= bound and block.attn.proj.weight.abs().max() > 0.8 * bound
        assert block.attn.qkv.weight.abs().max() > 0.8 / math.sqrt(D)


def test_our_v2_state_dict_round_trips_and_a_v1_file_is_refused_with_the_head_listed():
    src, dst = _v2_model(), _v2_model()
    result = load_beitv2_checkpoint(dst, src.state_dict())
    assert not (result.missing or result.unexpected)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    v1 = random_official_state_dict(D, 2, HEADS, PATCH, GRID, VOCAB)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"missing in checkpoint \(30\): cls_pt_layers.0.gamma_1"):
        load_beitv2_checkpoint(dst, {"model": v1})
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match=r"early_layers / head_layers / shared_lm_head .* a v1 file has no head"):
        load_checkpoint(dst, {"model": v1})  # the one loader: the v2 hint where the head's keys do not fit
    with pytest.raises(CheckpointMismatchError) as plain:
        load_checkpoint(micro_model(vocab_size=VOCAB), {"model": {**v1, "lm_head.weight": torch.zeros(3, D)}})
    assert "early_layers" not in str(plain.value)  # not for a model without the head
    assert load_beitv2_checkpoint is load_checkpoint
    loose = load_beitv2_checkpoint(dst, {"model": v1}, strict=False)  # continue from v1: the head starts fresh
    assert all(k.startswith("cls_pt_layers.") for k in loose.missing) and len(loose.missing) == 30
    torch.testing.assert_close(dst.lm_head.weight, v1["lm_head.weight"])


def test_v2_pretraining_file_into_a_classifier_drops_only_the_pretraining_parts():
    sd = official_v2_state_dict()
    classifier = timm.create_model("beit_lightning_micro_patch8_32", num_classes=7, img_size=32).eval()
    result = load_beitv2_checkpoint(classifier, {"model": sd})
    assert not (result.missing or result.unexpected or result.mismatched)
    head_keys = sorted(k for k in sd if k.startswith("cls_pt_layers."))
    assert len(head_keys) == 30
    dropped = " ".join(result.dropped)
    assert all(f"{k} (BEiT v2's patch-aggregation head" in dropped for k in head_keys)
    assert "mask_token" in dropped and "lm_head.weight" in dropped and "norm.weight" in dropped
    assert sorted(result.initialised) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    images, _ = _inputs()
    with torch.no_grad():
        tokens = classifier.forward_features(images)  # mean pooling: no final norm on the tokens
    _, _, reference_tokens = reference_v2(sd, images, torch.zeros(2, GRID, GRID, dtype=torch.bool), early_layers=1)
    torch.testing.assert_close(tokens, reference_tokens, atol=1e-4, rtol=1e-4)


def _timm_beitv2_micro(**kw):
    """timm's own ``beitv2_base_patch16_224`` entry point at the micro size."""
    return timm.create_model("beitv2_base_patch16_224", embed_dim=D, depth=2, num_heads=HEADS, patch_size=PATCH,
                             img_size=32, **kw).eval()


def test_v2_finetuned_layout_loads_and_exports_to_timm_beitv2_with_equal_outputs(tmp_path):
    sd = random_official_finetuned_state_dict(D, 2, HEADS, PATCH, GRID, num_classes=7)
    classifier = _timm_beitv2_micro(num_classes=7)
    result = load_beitv2_checkpoint(classifier, {"model": sd})
    assert not (result.missing or result.unexpected or result.mismatched or result.initialised)
    images, _ = _inputs()
    expected = reference_classifier_logits(sd, images, HEADS, PATCH)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), expected, atol=1e-4, rtol=1e-4)
    path = tmp_path / "beitv2_micro.pth"
    export_timm(classifier, path, model_name="beit_lightning_micro_patch8_32")
    # num_classes in the overlay too: otherwise timm re-initialises a head whose size differs from its 1000
    loaded = _timm_beitv2_micro(num_classes=7, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_base_size_v2_finetuned_file_exports_to_timm_beitv2_base(tmp_path):
    sd = random_official_finetuned_state_dict(768, 12, 12, 16, 14, num_classes=1000)
    official = tmp_path / "beitv2_base_patch16_224_pt1k_ft1k.pth"
    torch.save({"model": sd}, official)
    out = tmp_path / "timm.safetensors"
    export_timm(str(official), out, model_name="beitv2_base_patch16_224")
    del sd
    model = timm.create_model("beitv2_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # v2's ImageNet normalisation
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = reference_classifier_logits(torch.load(official)["model"], images, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-3, rtol=1e-3)  # fp32 over 12 blocks


@pytest.mark.slow(seconds=25)
def test_smoke_beitv2_as_shipped_trains_both_losses_down(tmp_path):
    """`beit-lightning experiment=smoke_beitv2` as shipped (micro BEiT v2 with the patch-aggregation head,
    a seeded micro VQ-KD, the generated data, 48 steps): both cross-entropies are logged, start near the
    uniform guess over the 64 codes and end well below it, and the logged loss is their sum.
    Measured with one thread (seeds 0/1): each loss 4.07-4.12 at the first logged step (uniform: ln 64 = 4.16),
    3.11-3.17 at the last; the bound (0.85 x 4.16 = 3.54) is ~8x the spread between seeds away."""
    import math

    from hydra import compose, initialize_config_module

    from beit_lightning.cli import train
    from conftest import logged

    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=smoke_beitv2", f"output_dir={tmp_path}", "logger=csv", "trainer.enable_progress_bar=false"])
    train(cfg)
    metrics = next(tmp_path.rglob("metrics.csv"))
    mim, head, total = (logged(metrics, f"train/{k}") for k in ("loss_mim", "loss_aggregation", "loss"))
    uniform = math.log(cfg.tokenizer.vocab_size)
    for losses in (mim, head):
        assert losses[0] > 0.93 * uniform, losses
        assert losses[-1] < 0.85 * uniform, losses
    assert total[-1] == pytest.approx(mim[-1] + head[-1], rel=1e-4)
    assert logged(metrics, "val/loss"), "validation did not run"
