"""The attention switch of BEiT (models/attention.py): every implementation computes timm's attention
with the relative position bias, forward and backward (the bias table's, q / v biases' gradients
included), and leaves the state dict as it was."""

import warnings

import pytest
import timm
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from timm.models.beit import Attention as TimmBeitAttention

from beit_lightning.models import BeitForMaskedImageModeling
from beit_lightning.models.attention import (
    BeitBiasAttention,
    bias_score_mod,
    dense_score_mod_attention,
    set_attention,
)
from conftest import micro_model

SWITCHED = ("sdpa_efficient", "flex")
#: fp32 on CPU: the implementations differ only in summation order
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL_OF_MAX = 2e-5  # gradients: absolute tolerance as a fraction of the tensor's largest element


def _randomise_biases_(model: torch.nn.Module) -> None:
    """The bias table and q / v biases start at zero: give them values so the forward uses them."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _step(model: torch.nn.Module, *inputs: torch.Tensor, features: bool = False):
    """Output and every parameter's gradient of a weighted sum of the output (``features``: of a
    timm model's ``forward_features``)."""
    model.train().zero_grad(set_to_none=True)
    out = model.forward_features(*inputs) if features else model(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    mask = torch.rand(3, 4, 4, generator=gen) < 0.5
    return images, mask


@pytest.mark.parametrize("attention", SWITCHED)
def test_outputs_and_gradients_equal_timm_sdpa(attention, batch):
    torch.manual_seed(0)
    reference = micro_model(drop_path_rate=0.0)
    _randomise_biases_(reference)
    torch.manual_seed(0)
    model = micro_model(drop_path_rate=0.0, attention=attention)
    assert model.attention == attention
    assert all(type(b.attn) is BeitBiasAttention and b.attn.attn_impl == attention for b in model.backbone.blocks)
    assert list(model.state_dict()) == list(reference.state_dict())  # keys, order: checkpoints unaffected
    model.load_state_dict(reference.state_dict())

    expected, expected_grads = _step(reference, *batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on CPU says it runs densely
        out, grads = _step(model, *batch)
    torch.testing.assert_close(out, expected, **TOL)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        # a gradient is a sum over every position: fp32 summation order (flex's dense reference, one thread or
        # two) moves it by up to 3.2e-6 of its largest element; a wrong kernel moves it by a large fraction
        atol = GRAD_TOL_OF_MAX * float(grad.abs().max())
        torch.testing.assert_close(grads[name], grad, rtol=TOL["rtol"], atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    table = "backbone.rel_pos_bias.relative_position_bias_table"
    for name in (table, "backbone.blocks.0.attn.q_bias", "backbone.blocks.1.attn.v_bias"):
        assert grads[name].abs().max() > 1e-4, name  # the bias gradients are really there and compared


def test_flex_forward_runs_flex_attention_itself(batch):
    """Without gradients (eval) the CPU path is torch's own flex_attention, not the dense reference."""
    torch.manual_seed(0)
    reference = micro_model(drop_path_rate=0.0).eval()
    _randomise_biases_(reference)
    model = micro_model(drop_path_rate=0.0, attention="flex").eval()
    model.load_state_dict(reference.state_dict())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the dense fallback would warn
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        torch.testing.assert_close(model(*batch), reference(*batch), **TOL)


def test_dense_reference_applies_the_score_mod_as_flex_attention_does():
    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=gen) for _ in range(3))
    bias = torch.randn(3, 9, 9, generator=gen)

    def score_mod(score, b, h, q_idx, kv_idx):  # depends on every index: a wrong broadcast would show
        return bias_score_mod(bias)(score, b, h, q_idx, kv_idx) + 0.1 * b - 0.05 * (q_idx - kv_idx).abs()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        expected = flex_attention(q, k, v, score_mod=score_mod)
    torch.testing.assert_close(dense_score_mod_attention(q, k, v, score_mod), expected, **TOL)


@pytest.mark.parametrize("attention", SWITCHED)
def test_per_block_bias_of_a_fine_tuning_beit(attention):
    """A timm Beit with a bias table in every block (fine-tuning) and no shared one."""
    torch.manual_seed(0)
    kw = dict(num_classes=0, img_size=32, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, drop_path_rate=0.0)
    reference = timm.create_model("beit_lightning_micro_patch8_32", **kw)
    _randomise_biases_(reference)
    model = timm.create_model("beit_lightning_micro_patch8_32", **kw)
    model.load_state_dict(reference.state_dict())
    assert set_attention(model, attention) == 2
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected, expected_grads = _step(reference, images, features=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, grads = _step(model, images, features=True)
    torch.testing.assert_close(out, expected, **TOL)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert grads["blocks.1.attn.relative_position_bias_table"].abs().max() > 1e-4
    assert set_attention(model, "sdpa") == 2 and all(type(b.attn) is TimmBeitAttention for b in model.blocks)


def test_bad_values_fail_with_the_fix():
    with pytest.raises(ValueError, match="one of"):
        micro_model(attention="flash")
    with pytest.raises(ValueError, match="model.attention=sdpa"):
        BeitForMaskedImageModeling("vit_tiny_patch16_224", vocab_size=8, img_size=32, patch_size=8, depth=1,
                                   attention="flex")
    with pytest.raises(ValueError, match="attention dropout"):
        micro_model(attention="flex", attn_drop_rate=0.1)
    vit = BeitForMaskedImageModeling("vit_tiny_patch16_224", vocab_size=8, img_size=32, patch_size=8, depth=1)
    assert vit.attention == "sdpa"
    with pytest.raises(ValueError, match="timm Beit"):
        set_attention(vit.backbone, "sdpa_efficient")


def test_the_config_key_reaches_the_model():
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=smoke", "model.attention=sdpa_efficient",
                                                       "output_dir=/tmp/x"])
        vit = compose(config_name="config", overrides=["experiment=smoke", "model=vit_micro", "output_dir=/tmp/x"])
    assert cfg.task.model.attention == "sdpa_efficient" and vit.task.model.attention == "sdpa"  # no key: sdpa
    with torch.device("meta"):
        model = instantiate(cfg.task.model)
    assert model.attention == "sdpa_efficient"
    assert all(b.attn.attn_impl == "sdpa_efficient" for b in model.backbone.blocks)
