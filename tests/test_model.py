import math

import pytest
import timm
import torch

from beit_lightning.checkpoints import load_checkpoint
from beit_lightning.models import BeitForMaskedImageModeling
from conftest import micro_model
from reference_beit import random_official_state_dict, reference_mim_logits


def _mask(batch, grid, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, grid * grid, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(grid * grid, generator=g)[:count]] = True
    return mask.reshape(batch, grid, grid)


def test_masked_logits_match_independent_reference():
    """Official-format weights, loaded from a saved .pth, give the reference forward's logits."""
    sd = random_official_state_dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, grid=4, vocab_size=50)
    model = micro_model(vocab_size=50).eval()
    load_checkpoint(model, {"model": sd})
    images = torch.randn(3, 3, 32, 32)
    mask = _mask(3, 4, 6)
    with torch.no_grad():
        ours = model(images, mask)
        ref = reference_mim_logits(sd, images, mask, num_heads=2, patch_size=8)
    assert ours.shape == (18, 50)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_own_weights_agree_with_reference_after_renaming():
    """The other direction: our freshly initialised model, its state dict renamed to the official
    layout, gives the same logits in the reference (so nothing hides in module code)."""
    model = micro_model(vocab_size=40).eval()
    with torch.no_grad():  # make the layer-scale and position tables non-trivial
        for name, p in model.named_parameters():
            if "gamma" in name or "relative_position_bias_table" in name:
                p.normal_(0.3, 0.1)
    sd = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    from reference_beit import relative_position_index

    sd["rel_pos_bias.relative_position_index"] = relative_position_index(4, 4)
    images, mask = torch.randn(2, 3, 32, 32), _mask(2, 4, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(images, mask), reference_mim_logits(sd, images, mask, 2, 8), atol=1e-5, rtol=1e-5)


def test_lm_head_runs_on_masked_positions_only():
    model = micro_model(vocab_size=30).eval()
    calls = []
    model.lm_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    images, mask = torch.randn(2, 3, 32, 32), _mask(2, 4, 3)
    with torch.no_grad():
        logits = model(images, mask)
        full = model.lm_head(model.forward_features(images, mask)[:, 1:])
    assert calls[0] == (6, 64)  # 2 images x 3 masked patches, not 2 x 16
    torch.testing.assert_close(logits, full[mask.flatten(1)])


def test_mask_token_replaces_masked_patches():
    """Masked patches do not see their pixels: changing pixels under the mask leaves logits equal."""
    model = micro_model().eval()
    images = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    altered = images.clone()
    altered[:, :, 8:24, 8:24] = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images, mask), model(altered, mask))
        assert not torch.allclose(model(images, ~mask), model(altered, ~mask))


def test_backbone_is_a_plain_timm_beit_state_dict():
    model = micro_model()
    reference = timm.create_model(
        "beit_lightning_micro_patch8_32", num_classes=0, use_abs_pos_emb=False, use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True, init_values=0.1, use_fc_norm=False,
    )
    assert set(model.backbone.state_dict()) == set(reference.state_dict())
    reference.load_state_dict(model.backbone.state_dict(), strict=True)
    assert isinstance(model.backbone, timm.models.beit.Beit)
    assert set(model.state_dict()) - {f"backbone.{k}" for k in reference.state_dict()} == {
        "mask_token", "lm_head.weight", "lm_head.bias"}


def test_beit_initialisation():
    torch.manual_seed(0)
    model = BeitForMaskedImageModeling("beit_lightning_small_patch16_224", vocab_size=8192, drop_path_rate=0.1)
    b = model.backbone
    fc1 = torch.cat([blk.mlp.fc1.weight.flatten() for blk in b.blocks])
    assert fc1.abs().max() <= 0.02 + 1e-7  # truncated at +-std, not +-2
    # truncated normal N(0, 0.02) on [-0.02, 0.02] has std 0.02 * 0.5396
    assert abs(fc1.std().item() - 0.02 * 0.5396) < 3e-4
    for layer_id, blk in enumerate(b.blocks, start=1):
        limit = 0.02 / math.sqrt(2 * layer_id) + 1e-7
        assert blk.attn.proj.weight.abs().max() <= limit
        assert blk.mlp.fc2.weight.abs().max() <= limit
        assert blk.mlp.fc2.weight.abs().max() > 0.9 * limit
        torch.testing.assert_close(blk.gamma_1, torch.full_like(blk.gamma_1, 0.1))
        assert blk.attn.q_bias.abs().max() == 0
    assert b.rel_pos_bias is not None and b.pos_embed is None
    assert all(blk.attn.relative_position_bias_table is None for blk in b.blocks)
    assert model.mask_token.abs().max() <= 0.02 and model.mask_token.std() > 0.005
    assert b.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(b.norm, torch.nn.LayerNorm) and b.norm.eps == 1e-6


@pytest.mark.parametrize(
    "name, dim, depth, heads",
    [("beit_lightning_micro_patch8_32", 64, 2, 2), ("beit_lightning_tiny_patch16_224", 192, 12, 3),
     ("beit_lightning_small_patch16_224", 384, 12, 6), ("beit_base_patch16_224", 768, 12, 12)],
)
def test_model_sizes(name, dim, depth, heads):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, depth, heads)


def test_our_names_do_not_collide_with_timm():
    ours = timm.list_models("beit_lightning_*")
    assert len(ours) == 3
    assert not set(ours) & set(timm.list_models("beit_*", exclude_filters=["beit_lightning_*"]))


def test_backbones_outside_the_vit_families_are_refused():
    """BEiT, ViT / DeiT and XCiT are pre-trained (tests/test_backbones.py); a CNN or a ViT whose patch
    embedding is a CNN (its receptive field would see the masked pixels) is refused."""
    with pytest.raises(ValueError, match="BEiT model name"):
        BeitForMaskedImageModeling("resnet18")
    with pytest.raises(ValueError, match="BEiT model name"):
        BeitForMaskedImageModeling("vit_small_r26_s32_224", img_size=64)  # timm's vision_transformer_hybrid
