"""The 3D U-Net of SuPreM / Models Genesis, written with the module names of SuPreM's checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchStatNorm3d(nn.BatchNorm3d):
    """Batch norm that always normalises with the statistics of the current batch, as SuPreM's
    ``ContBatchNorm3d`` does, but never updates its running buffers (so a frozen backbone's
    weights, and their checksum, stay exactly as loaded)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _LUConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = BatchStatNorm3d(cout)
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(self.bn1(self.conv1(x)))


class _Down(nn.Module):
    def __init__(self, cin: int, depth: int):
        super().__init__()
        width = 32 * 2 ** depth
        self.ops = nn.Sequential(_LUConv(cin, width), _LUConv(width, 2 * width))
        self.pool = depth < 3

    def forward(self, x):
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class _Up(nn.Module):
    def __init__(self, cin: int, depth: int):
        super().__init__()
        width = 32 * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(_LUConv(cin + cin // 2, width), _LUConv(width, width))

    def forward(self, x, skip):
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class SupremUNet3D(nn.Module):
    """The 3D U-Net of SuPreM / Models Genesis (19 M parameters), written here with the module
    names of SuPreM's ``backbone/unet.py`` (``down_tr64`` … ``up_tr64``, ``ops.N.conv1``,
    ``ops.N.bn1``) so that its checkpoints load key for key; then a 1×1×1 ``classifier`` (new).

    Input ``(B, 1, X, Y, Z)``, sizes divisible by 8; output ``(B, out_channels, X, Y, Z)``.
    """

    def __init__(self, out_channels: int = 1):
        super().__init__()
        self.down_tr64, self.down_tr128 = _Down(1, 0), _Down(64, 1)
        self.down_tr256, self.down_tr512 = _Down(128, 2), _Down(256, 3)
        self.up_tr256, self.up_tr128, self.up_tr64 = _Up(512, 2), _Up(256, 1), _Up(128, 0)
        self.classifier = nn.Conv3d(64, out_channels, kernel_size=1)

    def forward(self, x):
        x, s64 = self.down_tr64(x)
        x, s128 = self.down_tr128(x)
        x, s256 = self.down_tr256(x)
        x, _ = self.down_tr512(x)
        x = self.up_tr64(self.up_tr128(self.up_tr256(x, s256), s128), s64)
        return self.classifier(x)
