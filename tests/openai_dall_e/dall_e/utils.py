import math

import torch
import torch.nn.functional as F
from torch import nn

logit_laplace_eps = 0.1


def map_pixels(x):
    return (1 - 2 * logit_laplace_eps) * x + logit_laplace_eps


class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device, requires_grad=requires_grad)
        w.normal_(std=1 / math.sqrt(n_in * kw**2))
        b = torch.zeros((n_out,), dtype=torch.float32, device=device, requires_grad=requires_grad)
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)
