from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from .utils import Conv2d


class DecoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        conv = partial(Conv2d, device=device, requires_grad=requires_grad)
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", conv(n_in, self.n_hid, 1)),
            ("relu_2", nn.ReLU()), ("conv_2", conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", conv(self.n_hid, n_out, 3)),
        ]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Decoder(nn.Module):
    group_count = 4

    def __init__(self, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3, vocab_size=8192,
                 device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        blk_range = range(n_blk_per_group)
        n_layers = self.group_count * n_blk_per_group
        conv = partial(Conv2d, device=device, requires_grad=requires_grad)
        blk = partial(DecoderBlock, n_layers=n_layers, device=device, requires_grad=requires_grad)
        h = n_hid

        def up():
            return nn.Upsample(scale_factor=2, mode="nearest")

        self.blocks = nn.Sequential(OrderedDict([
            ("input", conv(vocab_size, n_init, 1, use_float16=False)),
            ("group_1", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", blk(n_init if i == 0 else 8 * h, 8 * h)) for i in blk_range],
                ("upsample", up())]))),
            ("group_2", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", blk(8 * h if i == 0 else 4 * h, 4 * h)) for i in blk_range],
                ("upsample", up())]))),
            ("group_3", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", blk(4 * h if i == 0 else 2 * h, 2 * h)) for i in blk_range],
                ("upsample", up())]))),
            ("group_4", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", blk(2 * h if i == 0 else h, h)) for i in blk_range]]))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", conv(h, 2 * output_channels, 1))]))),
        ]))

    def forward(self, x):
        if x.dtype != torch.float32:
            raise ValueError("input must have dtype torch.float32")
        return self.blocks(x)
