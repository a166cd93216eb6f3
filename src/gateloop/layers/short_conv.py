"""The short causal convolution any mixer can put on its inputs: option `short_conv` (the width W;
0, the default, leaves the mixer as it was).

    u_t = sum_{j < W} w[:, j] (.) x_{t - W + 1 + j}      depthwise: one filter of W taps per channel

with the inputs before the first taken as zeros, so u_t depends on x_{t-W+1} .. x_t only. As in
Mamba's conv1d and flash-linear-attention's `use_short_conv`, it hands the mixer a look at the last
few tokens (binding a key to the value after it wants the previous token), but here it acts on the
mixer's input x itself, before every projection, so one module serves all the mixers: the mixer
sees u in place of x. No bias, no activation. The taps start as nn.Conv1d's (and so Mamba's and
fla's) default, uniform in [-1/sqrt(W), 1/sqrt(W)], so the previous tokens weigh as much as the
current one from the first step. (A first version started from the identity, the previous taps at 0:
on MQAR the Transformer with it learnt no faster than without it, 0.32 against 0.315, where FoX,
whose token shift starts as an even mix of the current and the previous token, reached 1.000;
docs/tasks.md.) Each mixer builds its conv after its other parameters, so that these draw the same
random numbers with the option on as off.

The mixer contract needs the last W - 1 inputs carried between calls: with the option on a mixer's
state is {"conv": [B, W - 1, C] (those inputs, zeros before the first), "mixer": its own state}. The
conv part has the same shape at every length, so a mixer with a fixed-size state keeps one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONV, MIXER = "conv", "mixer"  # the keys of a state with the conv on


class ShortConv(nn.Module):
    """Depthwise causal conv1d of width W on [B, T, C], with its last W - 1 inputs as state.

    forward(x: [B, T, C], cache: [B, W - 1, C] or None) -> (u: [B, T, C], cache [B, W - 1, C]).
    One F.conv1d over the cache and x together serves every T, one token included.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 2:
            raise ValueError(f"short_conv must be 0 (off) or a width >= 2, got {width!r}")
        self.channels, self.width = channels, width
        self.weight = nn.Parameter(torch.empty(channels, width))  # w[:, j] multiplies x_{t - W + 1 + j}
        nn.init.uniform_(self.weight, -width ** -0.5, width ** -0.5)  # nn.Conv1d's default (fan_in = W)

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        past = x.new_zeros(B, self.width - 1, C) if cache is None else cache.to(x.dtype)
        padded = torch.cat([past, x], dim=1)  # [B, W - 1 + T, C]
        u = F.conv1d(padded.transpose(1, 2), self.weight.to(x.dtype).unsqueeze(1), groups=C)  # [B, C, T]
        return u.transpose(1, 2), padded[:, T:]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, width={self.width}"


def make_short_conv(channels: int, width: int) -> ShortConv | None:
    """The module for a mixer's `short_conv` option: None when width is 0 (off)."""
    if width == 0 and not isinstance(width, bool):
        return None
    return ShortConv(channels, width)


def conv_inputs(conv: ShortConv | None, x: Tensor, state):
    """What a mixer's forward starts with: (u, the mixer's own state, the conv's new cache). With no
    conv: (x, state, None), untouched."""
    if conv is None:
        return x, state, None
    u, cache = conv(x, None if state is None else state[CONV])
    return u, (None if state is None else state[MIXER]), cache


def with_conv_state(cache: Tensor | None, state):
    """What a mixer's forward returns as state: its own, joined with the conv's cache when there is one."""
    return state if cache is None else {CONV: cache, MIXER: state}
