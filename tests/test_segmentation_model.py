"""BeitUperNet: parity with Hugging Face's BeitForSemanticSegmentation, shapes, feature blocks, gradients."""

from __future__ import annotations

import re

import pytest
import torch

from beit_lightning.models import BeitUperNet

transformers = pytest.importorskip("transformers")

DIM, DEPTH, HEADS, PATCH, IMG, CLASSES, AUX = 64, 5, 2, 16, 64, 5, 16
OUT_INDICES = (0, 1, 2, 3)  # block 4 comes after the last index on purpose


def tiny(**kwargs) -> BeitUperNet:
    args = dict(num_classes=CLASSES, img_size=IMG, out_indices=OUT_INDICES, channels=DIM, aux_channels=AUX,
                embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    args.update(kwargs)
    return BeitUperNet("beit_base_patch16_224", **args)


def randomise_(model: torch.nn.Module) -> None:
    """Move every parameter and BatchNorm statistic off its initial value, so that a wrong mapping
    (a swapped layer-scale, a zero relative-position table, default BN stats) cannot hide.

    The BN statistics are measured on random images first (then perturbed): with arbitrary ones the
    head amplifies activations to logits of a few hundred, where float32 cannot resolve 1e-5 and
    the layout-dependent rounding of a convolution (HF feeds the neck a strided view) shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # classifiers stay at their init scale (N(0, 0.01))
            p.add_((0.01 if "conv_seg.weight" in name else 0.1) * torch.randn(p.shape, generator=gen))
        batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in batchnorms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, IMG, IMG, generator=gen))
        model.eval()
        for m in batchnorms:
            m.momentum = 0.1
            m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.4 + 0.8)


def to_hf_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> transformers' BeitForSemanticSegmentation names (timm's fused qkv is split)."""
    renames = [
        (r"^backbone\.cls_token$", "beit.embeddings.cls_token"),
        (r"^backbone\.patch_embed\.proj\.", "beit.embeddings.patch_embeddings.projection."),
        (r"^backbone\.blocks\.(\d+)\.norm1\.", r"beit.layers.\1.layernorm_before."),
        (r"^backbone\.blocks\.(\d+)\.norm2\.", r"beit.layers.\1.layernorm_after."),
        (r"^backbone\.blocks\.(\d+)\.gamma_(\d)$", r"beit.layers.\1.lambda_\2"),
        (r"^backbone\.blocks\.(\d+)\.attn\.q_bias$", r"beit.layers.\1.attention.q_proj.bias"),
        (r"^backbone\.blocks\.(\d+)\.attn\.v_bias$", r"beit.layers.\1.attention.v_proj.bias"),
        (r"^backbone\.blocks\.(\d+)\.attn\.proj\.", r"beit.layers.\1.attention.o_proj."),
        (r"^backbone\.blocks\.(\d+)\.attn\.relative_position_bias_table$",
         r"beit.layers.\1.relative_position_bias.relative_position_bias_table"),
        (r"^backbone\.blocks\.(\d+)\.mlp\.", r"beit.layers.\1.mlp."),
        (r"^neck\.fpn1\.0\.", "fpn.fpn1.conv_transpose1."),
        (r"^neck\.fpn1\.1\.", "fpn.fpn1.normalization."),
        (r"^neck\.fpn1\.3\.", "fpn.fpn1.conv_transpose2."),
        (r"^neck\.fpn2\.0\.", "fpn.fpn2."),
        (r"^decode_head\.psp_modules\.(\d+)\.1\.", r"decode_head.psp_modules.blocks.\1.conv."),
        (r"^decode_head\.bottleneck\.", "decode_head.psp_bottleneck."),
        (r"\.conv_seg\.", ".classifier."),
        (r"\.conv\.(weight)$", r".convolution.\1"),  # ConvModule parts (conv_seg is renamed above)
        (r"\.bn\.", ".normalization."),
    ]
    hf: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        match = re.fullmatch(r"backbone\.blocks\.(\d+)\.attn\.qkv\.weight", key)
        if match:
            q, k, v = value.chunk(3)
            for name, part in zip("qkv", (q, k, v), strict=True):
                hf[f"beit.layers.{match[1]}.attention.{name}_proj.weight"] = part
            continue
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        hf[key] = value
    return hf


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="the weight mapping uses transformers 5 names (4.x nests them as attention.attention.query...)")
def test_matches_transformers_beit_for_semantic_segmentation() -> None:
    torch.manual_seed(0)
    ours = tiny().eval()
    randomise_(ours)
    # transformers takes encoder_hidden_states[i - 1] for i in out_indices, and hidden_states[0] is
    # the patch embedding (hidden_states[k] = output of 0-based block k - 1); so HF index i picks
    # 0-based block i - 2 and our 0-based block b is HF's b + 2. (HF can therefore never select the
    # last block: its config only allows indices up to depth, which is why DEPTH is one more than needed.)
    config = transformers.BeitConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=IMG, patch_size=PATCH, num_labels=CLASSES, layer_norm_eps=1e-6, hidden_act="gelu",
        use_absolute_position_embeddings=False, use_relative_position_bias=True,
        use_shared_relative_position_bias=False, layer_scale_init_value=0.1, use_mean_pooling=True,
        out_indices=[b + 2 for b in OUT_INDICES], pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True, auxiliary_channels=AUX, auxiliary_num_convs=1, auxiliary_concat_input=False,
        drop_path_rate=0.0,
    )
    hf = transformers.BeitForSemanticSegmentation(config).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)

    aux_out: list[torch.Tensor] = []  # HF's output object does not carry the auxiliary logits
    hf.auxiliary_head.register_forward_hook(lambda _m, _i, out: aux_out.append(out))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        logits, aux = ours.forward_with_aux(x)
        hf_logits = hf(pixel_values=x).logits
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(aux, aux_out[0], rtol=0, atol=1e-5)
    assert 0.1 < logits.abs().max() < 100 and aux.abs().max() > 0.1  # not near-zero, in float32's range


def test_shapes() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        features = model.forward_features(x)
        logits, aux = model.forward_with_aux(x)
        plain = model(x)
    assert [tuple(f.shape) for f in features] == [(2, DIM, IMG // s, IMG // s) for s in (4, 8, 16, 32)]
    assert logits.shape == (2, CLASSES, IMG // 4, IMG // 4)
    assert aux.shape == (2, CLASSES, IMG // 16, IMG // 16)
    torch.testing.assert_close(plain, logits)

    no_aux = tiny(aux_head=False)
    assert no_aux.auxiliary_head is None
    assert no_aux.forward_with_aux(x)[1] is None


@pytest.mark.parametrize("bad", [(0, 1, 2), (1, 0, 2, 3), (0, 1, 2, DEPTH), (0, 1, 1, 3)])
def test_rejects_bad_out_indices(bad: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="out_indices"):
        tiny(out_indices=bad)


def test_features_come_from_the_requested_blocks() -> None:
    torch.manual_seed(0)
    model = tiny(out_indices=(0, 1, 3, 4)).eval()
    x = torch.randn(2, 3, IMG, IMG)
    block_out: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda _m, _i, out, i=i: block_out.__setitem__(i, out))
    neck_in: list[torch.Tensor] = []
    model.neck.register_forward_pre_hook(lambda _m, args: neck_in.extend(args[0]))
    with torch.no_grad():
        model(x)
    grid = IMG // PATCH
    for b, feature in zip((0, 1, 3, 4), neck_in, strict=True):  # patch tokens of the block, no final norm
        expected = block_out[b][:, 1:].transpose(1, 2).reshape(2, DIM, grid, grid)
        torch.testing.assert_close(feature, expected, rtol=0, atol=0)

    model = tiny().eval()
    with torch.no_grad():
        before = model(x)
        model.backbone.blocks[DEPTH - 1].mlp.fc2.weight.add_(1.0)  # after out_indices[-1]: no effect
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        model.backbone.blocks[OUT_INDICES[0]].mlp.fc2.weight.add_(1.0)
        assert not torch.allclose(model(x), before)


def test_gradients_reach_every_part() -> None:
    torch.manual_seed(0)
    model = tiny().train()
    logits, aux = model.forward_with_aux(torch.randn(2, 3, IMG, IMG))
    (logits.square().mean() + aux.square().mean()).backward()
    unused = f"backbone.blocks.{DEPTH - 1}."  # skipped: it is after the last out index
    for name, p in model.named_parameters():
        if name.startswith(unused):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for part in ("backbone.patch_embed", "backbone.blocks.0", "neck.fpn1", "neck.fpn2", "decode_head.psp_modules",
                 "decode_head.lateral_convs", "auxiliary_head.convs"):
        assert any(n.startswith(part) for n, _ in model.named_parameters()), part


def test_head_initialisation_follows_mmseg() -> None:
    torch.manual_seed(0)
    model = BeitUperNet("beit_base_patch16_224", num_classes=150, img_size=64, channels=128, embed_dim=128,
                        depth=4, num_heads=2, out_indices=(0, 1, 2, 3))
    for head in (model.decode_head, model.auxiliary_head):
        assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert head.conv_seg.bias.abs().max() == 0
    conv = model.decode_head.fpn_bottleneck.conv.weight  # Kaiming normal, fan_out, gain sqrt(2)
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    assert not any(n.startswith(("backbone.norm.", "backbone.fc_norm.")) for n, _ in model.named_parameters())
