"""An independent BEiT masked-image-modeling forward pass, written from the paper and the
official checkpoint layout (not from timm): explicit matrix products, a per-pair relative
position index, LayerNorm eps 1e-6. It reads a state dict in the official key naming."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relative_position_index(h: int, w: int) -> torch.Tensor:
    """(1 + h w) x (1 + h w) indices into the relative position table; the last three rows of the
    table are cls->token, token->cls and cls->cls."""
    n = h * w
    num_rel = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for p in range(n):
        r1, c1 = divmod(p, w)
        for q in range(n):
            r2, c2 = divmod(q, w)
            index[p + 1, q + 1] = (r1 - r2 + h - 1) * (2 * w - 1) + (c1 - c2 + w - 1)
    index[0, :] = num_rel - 3
    index[:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


def layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-6)


def reference_mim_logits(sd: dict, images: torch.Tensor, mask: torch.Tensor, num_heads: int, patch_size: int) -> torch.Tensor:
    """Logits at masked patches (batch-major), from an official-format BEiT pre-training state dict."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    b, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    m = mask.reshape(b, h * w, 1).float()
    x = x * (1 - m) + sd["mask_token"] * m
    x = torch.cat([sd["cls_token"].expand(b, 1, d), x], dim=1)
    if "pos_embed" in sd:
        x = x + sd["pos_embed"]
    table = sd["rel_pos_bias.relative_position_bias_table"]
    index = relative_position_index(h, w)
    bias = table[index.reshape(-1)].reshape(h * w + 1, h * w + 1, num_heads).permute(2, 0, 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    head_dim = d // num_heads
    for i in range(depth):
        p = f"blocks.{i}"
        y = layer_norm(x, sd, f"{p}.norm1")
        qkv_bias = torch.cat([sd[f"{p}.attn.q_bias"], torch.zeros_like(sd[f"{p}.attn.q_bias"]), sd[f"{p}.attn.v_bias"]])
        qkv = y @ sd[f"{p}.attn.qkv.weight"].T + qkv_bias
        q, k, v = qkv.reshape(b, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2) + bias
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, d)
        y = y @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"]
        x = x + sd[f"{p}.gamma_1"] * y
        y = layer_norm(x, sd, f"{p}.norm2")
        y = F.gelu(y @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"])
        y = y @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"]
        x = x + sd[f"{p}.gamma_2"] * y
    x = layer_norm(x, sd, "norm")[:, 1:]
    return x[mask.reshape(b, -1)] @ sd["lm_head.weight"].T + sd["lm_head.bias"]


def random_official_state_dict(embed_dim: int, depth: int, num_heads: int, patch_size: int, grid: int,
                               vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A BEiT pre-training checkpoint in the official layout, with random (non-trivial) values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    d, hidden = embed_dim, 4 * embed_dim
    num_rel = (2 * grid - 1) ** 2 + 3
    sd = {
        "cls_token": rnd(1, 1, d, scale=0.5),
        "mask_token": rnd(1, 1, d, scale=0.5),
        "patch_embed.proj.weight": rnd(d, 3, patch_size, patch_size),
        "patch_embed.proj.bias": rnd(d),
        "rel_pos_bias.relative_position_bias_table": rnd(num_rel, num_heads, scale=0.5),
        "rel_pos_bias.relative_position_index": relative_position_index(grid, grid),
        "norm.weight": 1 + rnd(d),
        "norm.bias": rnd(d),
        "lm_head.weight": rnd(vocab_size, d),
        "lm_head.bias": rnd(vocab_size),
    }
    for i in range(depth):
        p = f"blocks.{i}"
        sd.update({
            f"{p}.gamma_1": 0.5 + rnd(d), f"{p}.gamma_2": 0.5 + rnd(d),
            f"{p}.norm1.weight": 1 + rnd(d), f"{p}.norm1.bias": rnd(d),
            f"{p}.attn.q_bias": rnd(d), f"{p}.attn.v_bias": rnd(d),
            f"{p}.attn.qkv.weight": rnd(3 * d, d, scale=0.2),
            f"{p}.attn.proj.weight": rnd(d, d, scale=0.2), f"{p}.attn.proj.bias": rnd(d),
            f"{p}.norm2.weight": 1 + rnd(d), f"{p}.norm2.bias": rnd(d),
            f"{p}.mlp.fc1.weight": rnd(hidden, d, scale=0.2), f"{p}.mlp.fc1.bias": rnd(hidden),
            f"{p}.mlp.fc2.weight": rnd(d, hidden, scale=0.2), f"{p}.mlp.fc2.bias": rnd(d),
        })
    return sd


def reference_classifier_logits(sd: dict, images: torch.Tensor, num_heads: int, patch_size: int) -> torch.Tensor:
    """Class logits from an official-format *fine-tuned* BEiT state dict: per-block relative
    position tables, mean of the patch tokens, fc_norm, head."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    b, d, h, w = x.shape
    x = torch.cat([sd["cls_token"].expand(b, 1, d), x.flatten(2).transpose(1, 2)], dim=1)
    index = relative_position_index(h, w)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    head_dim = d // num_heads
    for i in range(depth):
        p = f"blocks.{i}"
        table = sd[f"{p}.attn.relative_position_bias_table"]
        bias = table[index.reshape(-1)].reshape(h * w + 1, h * w + 1, num_heads).permute(2, 0, 1)
        y = layer_norm(x, sd, f"{p}.norm1")
        qkv_bias = torch.cat([sd[f"{p}.attn.q_bias"], torch.zeros_like(sd[f"{p}.attn.q_bias"]), sd[f"{p}.attn.v_bias"]])
        q, k, v = (y @ sd[f"{p}.attn.qkv.weight"].T + qkv_bias).reshape(b, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        y = (((q / math.sqrt(head_dim)) @ k.transpose(-1, -2) + bias).softmax(-1) @ v).transpose(1, 2).reshape(b, -1, d)
        x = x + sd[f"{p}.gamma_1"] * (y @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"])
        y = F.gelu(layer_norm(x, sd, f"{p}.norm2") @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"])
        x = x + sd[f"{p}.gamma_2"] * (y @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"])
    pooled = layer_norm(x[:, 1:].mean(1), sd, "fc_norm")
    return pooled @ sd["head.weight"].T + sd["head.bias"]


def random_official_finetuned_state_dict(embed_dim, depth, num_heads, patch_size, grid, num_classes, seed=0):
    """A fine-tuned checkpoint in the official layout: per-block tables, fc_norm, head; no norm."""
    sd = random_official_state_dict(embed_dim, depth, num_heads, patch_size, grid, vocab_size=num_classes, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    shared = sd.pop("rel_pos_bias.relative_position_bias_table")
    sd.pop("rel_pos_bias.relative_position_index")
    for i in range(depth):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = shared + 0.1 * torch.randn(shared.shape, generator=g)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    sd["head.weight"], sd["head.bias"] = sd.pop("lm_head.weight"), sd.pop("lm_head.bias")
    sd.pop("mask_token")
    return sd
