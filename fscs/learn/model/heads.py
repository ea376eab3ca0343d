"""Classification and segmentation heads over the query-token grid (METHOD.md §5)."""

from __future__ import annotations

import torch
from torch import nn

from fscs.core.deterministic import interpolate_bilinear


class ClassificationHead(nn.Module):
    """(B, C + extra, gh, gw) -> (B, 2) (absent, present) logits.

    1x1 convs C+extra->C->C/2 with ReLU, 3x3/2 average pooling (padded, so any grid size works), 1x1 convs
    C/2->C/2->2, global average. ``extra``: prior-map channels concatenated to the input (0: none).
    """

    def __init__(self, channels: int = 128, hidden: int = 64, extra: int = 0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels + extra, channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class SegmentationHead(nn.Module):
    """(B, C + extra, gh, gw) -> (B, 2, 2gh, 2gw) (background, foreground) logits.

    3x3 convs C+extra->C->C/2 with ReLU, bilinear x2, 3x3 convs C/2->C/2 (ReLU) -> 2.
    """

    def __init__(self, channels: int = 128, hidden: int = 64, extra: int = 0):
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(channels + extra, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.post = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        y = interpolate_bilinear(y, scale_factor=2)
        return self.post(y)
