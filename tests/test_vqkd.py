"""VQ-KD against the official BEiT v2 recipe (microsoft/unilm beit2/): the normalised-EMA codebook
and its k-means start (norm_ema_quantizer.py), the projected CLIP target (modeling_vqkd.py
get_regress_target), the learning-rate rule (run_vqkd_training.py) and the shipped configs."""

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

from beit_lightning.models.tokenizers.vqkd import kmeans_cosine, teacher_patch_features
from beit_lightning.tasks import TokenizerTraining
from beit_lightning.tasks.tokenizer import create_teacher
from beit_lightning.tokenizers import VQKD, CosineVectorQuantizer, load_tokenizer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _tiny_vqkd(teacher_dim=16, **kwargs):
    return VQKD(teacher_dim=teacher_dim, vocab_size=32, code_dim=8, image_size=32, patch_size=8, embed_dim=32, depth=1,
                num_heads=2, decoder_dim=32, decoder_depth=1, **kwargs)


def _tiny_clip(proj_dim=16, img_size=32):
    """A CLIP image tower as timm builds vit_base_patch16_clip_quickgelu_224 (pre-norm, ln_post as
    ``norm``, class-token pooling, the projection as ``head``), at toy size and random weights."""
    torch.manual_seed(7)
    model = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=24, depth=2, num_heads=2, pre_norm=True,
                              global_pool="token", num_classes=proj_dim, norm_layer=partial(LayerNorm, eps=1e-5),
                              act_layer="quick_gelu")
    torch.nn.init.normal_(model.head.bias)  # timm's converted CLIP heads have a zero bias; test the general case
    model.pretrained_cfg = {"mean": CLIP_MEAN, "std": CLIP_STD}  # as timm's *.openai configs
    return model.eval()


# --- (a) the normalised EMA update ------------------------------------------------------------
def _hand_built_quantizer():
    q = CosineVectorQuantizer(num_codes=3, dim=3, decay=0.75, kmeans_init=False)
    q.embedding.copy_(torch.eye(3))
    return q


def test_ema_update_matches_the_closed_form_and_leaves_unused_codes_alone():
    q = _hand_built_quantizer()
    old = q.embedding.clone()
    z = torch.tensor([[[2.0, 0.5, 0.0], [1.0, -0.3, 0.2], [0.4, 3.0, 0.0]]], requires_grad=True)
    zn = F.normalize(z.detach()[0], dim=-1)
    q.train()
    quantized, idx, commitment = q(z)
    assert idx.tolist() == [[0, 0, 1]]  # code 2 gets no vector
    # official: w_k <- l2norm(decay * w_k + (1 - decay) * l2norm(sum_k / n_k)) for used codes
    m0 = F.normalize((zn[0] + zn[1]) / 2, dim=0)
    m1 = zn[2]
    expected = torch.stack([F.normalize(0.75 * old[0] + 0.25 * m0, dim=0),
                            F.normalize(0.75 * old[1] + 0.25 * m1, dim=0), old[2]])
    torch.testing.assert_close(q.embedding, expected)
    assert torch.equal(q.embedding[2], old[2])
    # usage statistic: EMA of the step's counts
    torch.testing.assert_close(q.cluster_size, 0.75 * torch.ones(3) + 0.25 * torch.tensor([2.0, 1.0, 0.0]))
    # forward value: the codes before the update; loss: beta (1) * mse(code.detach(), normalised z)
    torch.testing.assert_close(quantized[0], old[[0, 0, 1]])
    torch.testing.assert_close(commitment, F.mse_loss(zn, old[[0, 0, 1]]))
    # straight-through: the gradient of sum(quantized) w.r.t. the normalised z is the identity
    quantized.sum().backward()
    zz = z.detach()[0].clone().requires_grad_(True)
    F.normalize(zz, dim=-1).sum().backward()
    torch.testing.assert_close(z.grad[0], zz.grad)
    # eval mode changes nothing
    q.eval()
    before = q.embedding.clone()
    q(z.detach())
    assert torch.equal(q.embedding, before)


def test_dead_code_restart_is_optional():
    z = torch.tensor([[[2.0, 0.2, 0.0], [0.1, 3.0, 0.0], [1.0, 0.1, 0.1]]])
    off = _hand_built_quantizer().eval()
    assert off(z * torch.tensor([[[0.1], [5.0], [1.0]]]))[1].tolist() == [[0, 1, 0]]  # nearest by cosine, any norm
    off.train()
    for _ in range(5):
        off(z)
    assert torch.equal(off.embedding[2], torch.eye(3)[2])  # official: never restarted
    on = CosineVectorQuantizer(num_codes=3, dim=3, decay=0.5, dead_threshold=0.2, kmeans_init=False)
    on.embedding.copy_(torch.eye(3))
    on.train()
    for _ in range(3):  # code 2's count 1 -> 0.5 -> 0.25 -> 0.125 < 0.2: restarted on an encoder vector
        on(z)
    zs = F.normalize(z[0], dim=-1)
    assert any(torch.allclose(on.embedding[2], v) for v in zs)


# --- (b) the k-means start ---------------------------------------------------------------------
def test_kmeans_init_gives_the_normalised_cluster_means_on_separated_data():
    torch.manual_seed(0)
    centres = torch.eye(8)[:4]
    points = torch.cat([c + 0.1 * torch.randn(50, 8) for c in centres])
    labels = torch.arange(4).repeat_interleave(50)
    zn = F.normalize(points, dim=-1)
    means = F.normalize(torch.stack([zn[labels == k].mean(0) for k in range(4)]), dim=-1)
    # like the official kmeans(), the means start on random samples, so an unlucky draw can merge two
    # clusters (about 1 seed in 4 here); with this seed the 10 iterations separate all four
    torch.manual_seed(0)
    q = CosineVectorQuantizer(num_codes=4, dim=8, kmeans_init=True).train()
    before = q.embedding.clone()
    q.decay = 1.0  # isolate the initialisation from the first EMA step
    _, idx, _ = q(points[None])
    assert bool(q.initted) and not torch.equal(q.embedding, before)
    order = [int(idx[0, labels == k][0]) for k in range(4)]
    assert sorted(order) == [0, 1, 2, 3]
    torch.testing.assert_close(q.embedding[order], means)
    torch.testing.assert_close(q.cluster_size[order], torch.full((4,), 50.0))
    # once done it is not redone (the flag is a buffer, so a resumed run skips it too)
    state = q.state_dict()
    assert state["initted"].item() is True
    fresh = CosineVectorQuantizer(num_codes=4, dim=8, kmeans_init=True)
    fresh.load_state_dict(state)
    fresh.decay = 1.0
    fresh.train()(torch.randn(1, 10, 8))
    torch.testing.assert_close(fresh.embedding, q.embedding)


def test_kmeans_cosine_is_a_fixed_point_of_lloyd_steps():
    zn = F.normalize(torch.randn(300, 5), dim=-1)
    means, counts = kmeans_cosine(zn, 6, iters=30)
    assign = (zn @ means.t()).argmax(-1)
    assert counts.sum() == 300
    for k in range(6):
        if counts[k] > 0:
            torch.testing.assert_close(means[k], F.normalize(zn[assign == k].sum(0), dim=0), atol=1e-5, rtol=0)


def test_old_quantizer_checkpoints_still_load():
    q = CosineVectorQuantizer(4, 3)
    state = {"embedding": F.normalize(torch.randn(4, 3), dim=-1), "cluster_size": torch.ones(4),
             "embed_sum": torch.randn(4, 3)}
    q.load_state_dict(state)
    assert bool(q.initted) and torch.equal(q.embedding, state["embedding"])


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist, torch.nn.functional as F
    from beit_lightning.tokenizers import CosineVectorQuantizer

    rank, world, init, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different data (and RNG) on each rank
    km = CosineVectorQuantizer(16, 4, kmeans_init=True).train()
    km.decay = 1.0
    km(torch.randn(1, 64, 4))
    q = CosineVectorQuantizer(3, 3, decay=0.5, kmeans_init=False).train()
    q.embedding.copy_(torch.eye(3))
    z = torch.tensor([[[1.0, 0.2, 0.0]], [[0.1, 0.0, 1.0]]])[rank : rank + 1]  # rank 0 -> code 0, rank 1 -> code 2
    q(z)
    json.dump({"kmeans": km.embedding.tolist(), "ema": q.embedding.tolist()}, open(f"{out}.{rank}", "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_ranks_share_the_kmeans_start_and_the_ema_statistics(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(DDP_SCRIPT)
    init, out = f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, out], env=env, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    assert r0["kmeans"] == r1["kmeans"], "rank 0's k-means codebook must be broadcast"
    assert r0["ema"] == r1["ema"]
    ema = torch.tensor(r0["ema"])
    # each rank saw one code used, but the all-reduced counts move both codes on both ranks
    torch.testing.assert_close(ema[0], F.normalize(0.5 * torch.eye(3)[0] + 0.5 * F.normalize(torch.tensor([1.0, 0.2, 0]), dim=0), dim=0))
    torch.testing.assert_close(ema[2], F.normalize(0.5 * torch.eye(3)[2] + 0.5 * F.normalize(torch.tensor([0.1, 0, 1.0]), dim=0), dim=0))
    torch.testing.assert_close(ema[1], torch.eye(3)[1])


# --- (c) the projected CLIP target -------------------------------------------------------------
def test_projected_target_is_every_patch_token_through_ln_post_and_the_projection():
    teacher = _tiny_clip(proj_dim=16)
    task = TokenizerTraining(_tiny_vqkd(teacher_dim=16), teacher=teacher, teacher_target="projected")
    images = torch.rand(2, 3, 32, 32)
    clip_mean, clip_std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = teacher.patch_embed((images - clip_mean) / clip_std)  # CLIP normalisation (the timm CLIP cfg)
        x = torch.cat([teacher.cls_token.expand(2, -1, -1), x], dim=1) + teacher.pos_embed
        x = teacher.norm_pre(x)  # ln_pre
        for block in teacher.blocks:
            x = block(x)
        x = teacher.norm(x)[:, 1:]  # ln_post, class token dropped
        manual = x @ teacher.head.weight.t() + teacher.head.bias  # @ visual.proj
        target = task.teacher_targets(images)
    assert target.shape == (2, 16, 16)
    torch.testing.assert_close(target, manual)
    # "features" is the un-projected 24-d tokens after ln_post
    plain = TokenizerTraining(_tiny_vqkd(teacher_dim=24), teacher=teacher, teacher_target="features")
    torch.testing.assert_close(plain.teacher_targets(images), x)


def test_teacher_dim_and_target_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match="teacher_dim=16"):
        TokenizerTraining(_tiny_vqkd(teacher_dim=24), teacher=_tiny_clip(16), teacher_target="projected")
    with pytest.raises(ValueError, match="teacher_dim=24"):
        TokenizerTraining(_tiny_vqkd(teacher_dim=16), teacher=_tiny_clip(16), teacher_target="features")
    headless = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match="linear projection"):
        TokenizerTraining(_tiny_vqkd(teacher_dim=24), teacher=headless, teacher_target="projected")
    with pytest.raises(ValueError, match="teacher_target must be one of"):
        TokenizerTraining(_tiny_vqkd(), teacher=_tiny_clip(16), teacher_target="logits")


def test_the_official_teacher_name_gives_512_d_projected_targets_with_clip_normalisation():
    task = TokenizerTraining(_tiny_vqkd(teacher_dim=512), teacher="vit_base_patch16_clip_quickgelu_224.openai",
                             teacher_target="projected")
    assert task.teacher.head.out_features == 512 and task.teacher.head.in_features == 768
    assert type(task.teacher.blocks[0].mlp.act).__name__ == "QuickGELU"  # OpenAI CLIP's activation
    torch.testing.assert_close(task.teacher_mean.flatten(), torch.tensor(CLIP_MEAN))
    torch.testing.assert_close(task.teacher_std.flatten(), torch.tensor(CLIP_STD))


def test_a_teacher_of_another_input_size_gets_a_bicubic_resize():
    teacher = _tiny_clip(16, img_size=32)
    images = torch.rand(2, 3, 16, 16)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    with torch.no_grad():
        got = teacher_patch_features(teacher, images, (4, 4), projected=True, mean=mean, std=std)
        big = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        want = teacher.head(teacher.forward_features((big - mean) / std)[:, 1:])
    torch.testing.assert_close(got, want)


# --- (d) the learning-rate rule ----------------------------------------------------------------
def _fake_trainer(batch_size=32, steps_per_epoch=100, epochs=100):
    return SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch_size), world_size=1, accumulate_grad_batches=1,
                           estimated_stepping_batches=steps_per_epoch * epochs, num_training_batches=steps_per_epoch,
                           precision="32-true", max_epochs=epochs)


def test_lr_scales_with_the_batch_over_128_and_min_lr_does_not():
    task = TokenizerTraining(_tiny_vqkd(), teacher=_tiny_clip(16), teacher_target="projected", lr=5e-5, min_lr=1e-5,
                             betas=(0.9, 0.99), weight_decay=1e-4, warmup_steps=None, warmup_epochs=10,
                             lr_base_batch=128)
    task.trainer = _fake_trainer(batch_size=32)
    out = task.configure_optimizers()
    optimizer, scheduler = out["optimizer"], out["lr_scheduler"]["scheduler"]
    peak = 5e-5 * 32 / 128
    for group in optimizer.param_groups:
        assert group["initial_lr"] == pytest.approx(peak)
        assert group["betas"] == (0.9, 0.99)
    schedule = scheduler.lr_lambdas[0]
    assert schedule(0) == 0.0  # official cosine_scheduler: the warmup starts at 0
    assert schedule(500) * peak == pytest.approx(peak / 2)
    assert schedule(1000) * peak == pytest.approx(peak)  # 10 warmup epochs of 100 steps
    assert schedule(10_000) * peak == pytest.approx(1e-5)  # min_lr as given, not x 32/128
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for part in (task.tokenizer.encoder, task.tokenizer.decoder):  # official VQKD.no_weight_decay()
        assert id(part.pos_embed) not in decayed and id(part.cls_token) not in decayed
    assert id(task.tokenizer.decoder.blocks[0].attn.qkv.weight) in decayed

    unscaled = TokenizerTraining(_tiny_vqkd(), teacher=_tiny_clip(16), teacher_target="projected", lr=5e-5, min_lr=1e-5,
                                 warmup_steps=0)
    unscaled.trainer = _fake_trainer(batch_size=32)
    out = unscaled.configure_optimizers()
    assert out["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(5e-5)
    assert out["lr_scheduler"]["scheduler"].lr_lambdas[0](10_000) * 5e-5 == pytest.approx(1e-5)


# --- the shipped recipe --------------------------------------------------------------------------
def test_vqkd_imagenet_experiment_is_the_official_recipe():
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=vqkd_imagenet", "output_dir=/tmp/x"])
    task, tok = cfg.task, cfg.task.tokenizer
    assert (task.lr, task.lr_base_batch, task.min_lr) == (5e-5, 128, 1e-5)
    assert (list(task.betas), task.weight_decay, task.warmup_epochs, task.warmup_steps) == ([0.9, 0.99], 1e-4, 10, None)
    assert (task.teacher, task.teacher_target, tok.teacher_dim) == (
        "vit_base_patch16_clip_quickgelu_224.openai", "projected", 512)
    assert (tok.vocab_size, tok.code_dim, tok.decay, tok.dead_threshold, tok.kmeans_init) == (8192, 32, 0.99, None, True)
    assert (tok.depth, tok.embed_dim, tok.decoder_depth, tok.decoder_dim, tok.commitment_weight) == (12, 768, 3, 768, 1.0)
    assert list(tok.mean) == list(tok.std) == [0.5, 0.5, 0.5]
    assert cfg.data.batch_size * cfg.trainer.devices == 512 and cfg.trainer.max_epochs == 100
    assert cfg.trainer.gradient_clip_val is None
    assert (cfg.data.tokenizer_size, list(cfg.data.scale), cfg.data.hflip) == (224, [0.08, 1.0], 0.5)
    assert cfg.data.tokenizer_interpolation == "bicubic"
    assert cfg.trainer.precision == "16-mixed"  # engine_for_vqkd.py: torch.cuda.amp.autocast + NativeScaler
    assert tok.num_heads == tok.decoder_num_heads == 12


def test_task_tokenizer_vqkd_alone_does_not_clip_gradients():
    for trainer in ("cpu", "gpu", "ddp"):
        with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=["task=tokenizer_vqkd", f"trainer={trainer}", "output_dir=/tmp/x"])
        assert cfg.trainer.gradient_clip_val is None, trainer  # run_vqkd_training.py --clip_grad default None


# --- (e) the official architecture, initialisation and released files -------------------------
# Names and shapes written out from beit2/modeling_finetune.py (VisionTransformer with
# get_model_default_params(): qkv_bias=True as q_bias/v_bias, use_mean_pooling=True -> fc_norm, no head),
# modeling_vqkd.py (encode_task_layer, decode_task_layer, decoder over the code map with patch_size 1)
# and norm_ema_quantizer.py (NormEMAVectorQuantizer / EmbeddingEMA buffers).
def _official_vit_state(prefix, img_size, patch, in_chans, dim, depth, gen):
    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    state = {f"{prefix}.cls_token": rnd(1, 1, dim), f"{prefix}.pos_embed": rnd(1, (img_size // patch) ** 2 + 1, dim),
             f"{prefix}.patch_embed.proj.weight": rnd(dim, in_chans, patch, patch),
             f"{prefix}.patch_embed.proj.bias": rnd(dim)}
    for i in range(depth):
        b = f"{prefix}.blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + rnd(dim), b + "norm1.bias": rnd(dim), b + "attn.qkv.weight": rnd(3 * dim, dim),
            b + "attn.q_bias": rnd(dim), b + "attn.v_bias": rnd(dim), b + "attn.proj.weight": rnd(dim, dim),
            b + "attn.proj.bias": rnd(dim), b + "norm2.weight": 1 + rnd(dim), b + "norm2.bias": rnd(dim),
            b + "mlp.fc1.weight": rnd(4 * dim, dim), b + "mlp.fc1.bias": rnd(4 * dim),
            b + "mlp.fc2.weight": rnd(dim, 4 * dim), b + "mlp.fc2.bias": rnd(dim)})
    state.update({f"{prefix}.fc_norm.weight": 1 + rnd(dim), f"{prefix}.fc_norm.bias": rnd(dim)})
    return state


def _official_vqkd_state(decoder_depth, teacher_dim, img=32, patch=8, dim=48, depth=2, dec_dim=48, vocab=64, code=8):
    gen = torch.Generator().manual_seed(decoder_depth)
    state = _official_vit_state("encoder", img, patch, 3, dim, depth, gen)
    state.update(_official_vit_state("decoder", img // patch, 1, code, dec_dim, decoder_depth, gen))
    for name, d_in, d_out in (("encode_task_layer", dim, code), ("decode_task_layer", dec_dim, teacher_dim)):
        state.update({f"{name}.0.weight": 0.2 * torch.randn(d_in, d_in, generator=gen),
                      f"{name}.0.bias": 0.2 * torch.randn(d_in, generator=gen),
                      f"{name}.2.weight": 0.2 * torch.randn(d_out, d_in, generator=gen),
                      f"{name}.2.bias": 0.2 * torch.randn(d_out, generator=gen)})
    codes = F.normalize(torch.randn(vocab, code, generator=gen), dim=-1)  # kept unit-norm by norm_ema_inplace
    state.update({"quantize.embedding.weight": codes, "quantize.embedding.cluster_size": torch.rand(vocab, generator=gen),
                  "quantize.embedding.embed_avg": torch.randn(vocab, code, generator=gen),
                  "quantize.embedding.initted": torch.tensor([1.0]), "quantize.cluster_size": torch.rand(vocab, generator=gen),
                  # a training checkpoint also holds the teacher and ScalingLayerForClip's buffers
                  "teacher_model.visual.proj": torch.randn(4, 4, generator=gen),
                  "scaling_layer.shift": torch.rand(1, 3, 1, 1), "scaling_layer.scale": torch.rand(1, 3, 1, 1)})
    return state


def _official_vit_forward(s, prefix, x, heads, depth, patch):
    """modeling_finetune.VisionTransformer.forward(x, return_patch_tokens=True), written out."""
    x = F.conv2d(x, s[f"{prefix}.patch_embed.proj.weight"], s[f"{prefix}.patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[f"{prefix}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s[f"{prefix}.pos_embed"]
    B, N, C = x.shape
    for i in range(depth):
        p = f"{prefix}.blocks.{i}."
        h = F.layer_norm(x, (C,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
        bias = torch.cat([s[p + "attn.q_bias"], torch.zeros_like(s[p + "attn.v_bias"]), s[p + "attn.v_bias"]])
        q, k, v = F.linear(h, s[p + "attn.qkv.weight"], bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, -1), s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])), s[p + "mlp.fc2.weight"],
                     s[p + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x[:, 1:], (C,), s[f"{prefix}.fc_norm.weight"], s[f"{prefix}.fc_norm.bias"], eps=1e-6)


def _task_layer(s, name, x):
    return F.linear(torch.tanh(F.linear(x, s[f"{name}.0.weight"], s[f"{name}.0.bias"])), s[f"{name}.2.weight"],
                    s[f"{name}.2.bias"])


def _official_tokens_and_decoding(s, images, heads, enc_depth, dec_depth, patch):
    """VQKD.get_tokens (pre_process 'default', encode, NormEMAVectorQuantizer's argmin distance) and
    VQKD.decode of the quantised codes, written out."""
    x = images * 255.0 / 127.5 - 1.0
    z = F.normalize(_task_layer(s, "encode_task_layer", _official_vit_forward(s, "encoder", x, heads, enc_depth, patch)),
                    dim=-1)
    w = s["quantize.embedding.weight"]
    flat = z.reshape(-1, w.shape[1])
    d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * flat @ w.t()
    tokens = d.argmin(1).view(images.shape[0], -1)
    side = math.isqrt(tokens.shape[1])
    code_map = w[tokens].view(images.shape[0], side, side, -1).permute(0, 3, 1, 2)  # 'b h w c -> b c h w'
    decoded = _task_layer(s, "decode_task_layer", _official_vit_forward(s, "decoder", code_map, heads, dec_depth, 1))
    return tokens, decoded


@pytest.mark.parametrize("variant, decoder_depth, teacher_dim", [("clip 3x768x12", 3, 16), ("dino 1x768x12", 1, 24)])
def test_official_vqkd_files_load_with_every_key_placed_and_equal_outputs(tmp_path, variant, decoder_depth, teacher_dim):
    state = _official_vqkd_state(decoder_depth, teacher_dim)
    # as utils.save_model writes it: the model, the optimiser, the epoch, the run's argparse.Namespace
    path = tmp_path / "vqkd.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 99,
                "args": argparse.Namespace(model="vqkd", codebook_n_emd=64)}, path)
    tokenizer = VQKD.from_official(path)  # 12 heads in encoder and decoder, as get_model_default_params()
    assert (tokenizer.config["decoder_depth"], tokenizer.config["teacher_dim"], tokenizer.config["depth"]) == (
        decoder_depth, teacher_dim, 2)
    assert (tokenizer.vocab_size, tokenizer.image_size, tokenizer.grid_size) == (64, 32, (4, 4))
    # every key of the file is placed: our state is exactly the file's, renamed, less the teacher's and the two
    # buffers no official computation reads
    ours = tokenizer.state_dict()
    placed = {k for k in state if not k.startswith(("teacher_model.", "scaling_layer."))} - {
        "quantize.embedding.cluster_size", "quantize.embedding.embed_avg"}
    assert len(ours) == len(placed)
    renames = {"encode_task_layer": "encode_head", "decode_task_layer": "decode_head",
               "quantize.embedding.weight": "quantizer.embedding", "quantize.cluster_size": "quantizer.cluster_size",
               "quantize.embedding.initted": "quantizer.initted"}
    for key in placed:
        ours_key = next((key.replace(a, b, 1) for a, b in renames.items() if key.startswith(a)), key)
        if ours_key == "quantizer.initted":
            assert ours[ours_key].item() is True
        else:
            assert torch.equal(ours[ours_key], state[key]), key
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    want_tokens, want_decoded = _official_tokens_and_decoding(state, images, 12, 2, decoder_depth, 8)
    tokens = tokenizer.encode(images)
    assert torch.equal(tokens.flatten(1), want_tokens)
    assert len(want_tokens.unique()) > 8  # a real test of the assignment, not one code everywhere
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.decode_tokens(tokens), want_decoded, atol=1e-5, rtol=1e-4)
    # load_tokenizer (tokenizer=vqkd tokenizer.checkpoint=...) takes the official file too
    torch.save({"model": state}, tmp_path / "released.pth")
    loaded = load_tokenizer(tmp_path / "released.pth", vocab_size=64, image_size=32)
    assert isinstance(loaded, VQKD) and torch.equal(loaded.encode(images), tokens)


def test_an_official_state_that_does_not_fit_names_the_keys():
    state = _official_vqkd_state(3, 16)
    del state["decoder.blocks.2.attn.q_bias"]
    state["encoder.blocks.0.attn.k_bias"] = torch.zeros(48)
    with pytest.raises(ValueError, match=r"decoder\.blocks\.2\.attn\.q_bias.*encoder\.blocks\.0\.attn\.k_bias"):
        VQKD.from_official(state)
    with pytest.raises(ValueError, match="not an official VQ-KD tokenizer"):
        VQKD.from_official({"model": {"encoder.cls_token": torch.zeros(1, 1, 8)}})


def test_encoder_decoder_and_task_layers_are_initialised_as_the_official_code():
    torch.manual_seed(0)
    tok = VQKD(teacher_dim=64, vocab_size=16, code_dim=8, image_size=32, patch_size=8, embed_dim=128, depth=3,
               num_heads=4, decoder_dim=128, decoder_depth=3)
    for vit in (tok.encoder, tok.decoder):
        assert vit.pos_embed.shape[1] == 17 and vit.cls_token.shape == (1, 1, 128)  # class token + 16 positions
        for i, block in enumerate(vit.blocks):
            assert block.attn.qkv.bias is None and "k_bias" not in dict(block.attn.named_parameters())
            assert not block.attn.q_bias.any() and not block.attn.v_bias.any()
            assert block.gamma_1 is None  # init_values=0.: no layer scale
            for linear, rescaled in ((block.attn.qkv, False), (block.mlp.fc1, False), (block.attn.proj, True),
                                     (block.mlp.fc2, True)):
                want = 0.02 / math.sqrt(2 * (i + 1)) if rescaled else 0.02  # fix_init_weight
                assert abs(linear.weight.std().item() / want - 1) < 0.05, (i, linear)
                assert linear.bias is None or not linear.bias.any()
        norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert len(norms) == 2 * 3 + 1 and all(m.eps == 1e-6 for m in norms)
    assert tok.decoder.patch_embed.proj.kernel_size == (1, 1) and tok.decoder.patch_embed.proj.in_channels == 8
    for head in (tok.encode_head, tok.decode_head):
        assert abs(head[0].weight.std().item() / 0.02 - 1) < 0.05 and not head[0].bias.any() and not head[2].bias.any()


def test_teacher_without_weights_names_the_model_and_how_to_fetch_it(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'test_vit\.r160_in1k' \(Hugging Face timm/test_vit\.r160_in1k\)"
                                                r"(.|\n)*timm\.create_model(.|\n)*task\.teacher_file"):
        create_teacher("test_vit.r160_in1k", pretrained=True, num_classes=0)
    # the documented way out: the weights file given directly
    torch.manual_seed(3)
    reference = timm.create_model("test_vit", num_classes=0)
    torch.save(reference.state_dict(), tmp_path / "teacher.pth")
    teacher = create_teacher("test_vit.r160_in1k", pretrained=True, file=str(tmp_path / "teacher.pth"), num_classes=0)
    want = reference.state_dict()
    assert teacher.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in teacher.state_dict().items())
