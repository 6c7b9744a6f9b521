"""Patch embeddings as one matmul: a convolution whose kernel covers its whole input.

Qwen2.5-VL and Qwen3-VL cut each image into patches before the vision tower and embed each
``(C, T, P, P)`` patch with an ``nn.Conv3d`` whose kernel and stride are that size: a matrix
product written as a convolution. On a CPU, oneDNN's bf16 3-D convolution ran it at 0.002
TFLOP/s (27 s for Qwen3-VL-4B's 15680 patches of 20 images, profiled at full size, where
the tower's matmuls ran at 0.12): :func:`speed_up_patch_embeddings` runs such convolutions
as ``F.linear`` over the flattened patch (the same sum; equal to float rounding). Inputs of
any other shape run the convolution.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def patch_as_linear(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, as one matmul where ``x``'s spatial size is the kernel's."""
    if tuple(x.shape[2:]) != tuple(conv.kernel_size):
        return type(conv).forward(conv, x)
    out = F.linear(x.reshape(x.shape[0], -1), conv.weight.reshape(conv.out_channels, -1), conv.bias)
    return out.view(x.shape[0], conv.out_channels, *[1] * (x.dim() - 2))


def speed_up_patch_embeddings(model: nn.Module) -> int:
    """Installs :func:`patch_as_linear` on every ``model`` convolution whose stride is its
    kernel (no padding, dilation or groups); returns how many."""
    changed = 0
    for module in model.modules():
        if (isinstance(module, (nn.Conv2d, nn.Conv3d)) and tuple(module.stride) == tuple(module.kernel_size)
                and not isinstance(module.padding, str) and not any(module.padding) and module.groups == 1
                and all(d == 1 for d in module.dilation)):
            module.forward = partial(patch_as_linear, module)
            changed += 1
    return changed
