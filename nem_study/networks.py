"""The networks inside an M-step (NEM_SPEC.md §3): the layers and their initialisation.

Linear or conv -> LayerNorm -> activation, as the authors' TF 1 code builds them: ``fc``,
``conv``, the sub-pixel ``up_conv`` (``UpConv``), ``make_networks`` (an encoder and a decoder
per ``model.network``), and ``tf_init_``, the TF 1 initialisation (``init: tf``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nem_study.config import ModelConfig


class ChannelLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) with one gain and one bias per channel (NEM_SPEC.md §3).

    TF slim's ``layer_norm`` on an NHWC tensor: moments over every non-batch dim, the learned
    affine on the last (channel) axis only. ``nn.LayerNorm((C, H, W))`` would learn one per element.
    """

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))           # (C,)
        self.bias = nn.Parameter(torch.zeros(channels))            # (C,)

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, x.shape[1:], eps=self.eps)             # (N, C, H, W), no affine
        return y * self.weight.view(-1, 1, 1) + self.bias.view(-1, 1, 1)


def layer_norm(cfg: ModelConfig, shape: tuple[int, ...]) -> nn.Module:
    """LayerNorm over a layer's output ``shape`` (§3): (features,) after an fc, one gain per
    feature; (C, H, W) after a conv, one gain per channel or per element (``layer_norm_affine``)."""
    if len(shape) == 3 and cfg.layer_norm_affine == "channel":
        return ChannelLayerNorm(shape[0], cfg.layer_norm_eps)
    return nn.LayerNorm(shape, eps=cfg.layer_norm_eps)


def fc(cfg: ModelConfig, n_in: int, n_out: int, act: type[nn.Module] | None, ln: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
    if ln:
        layers.append(layer_norm(cfg, (n_out,)))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def conv(cfg: ModelConfig, c_in: int, c_out: int, size: int, act: type[nn.Module] | None,
         ln: bool = True) -> nn.Sequential:
    """conv 4x4 stride 2 with SAME padding: size -> size / 2."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
    if ln:
        layers.append(layer_norm(cfg, (c_out, size // 2, size // 2)))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class UpConv(nn.Module):
    """Nearest-neighbour upsample x2, then a 4x4 stride-1 conv with TF's SAME padding (§3).

    Computed as one 3x3 conv that outputs the four sub-pixel phases, then a pixel shuffle:
    the upsampled image repeats each pixel twice, so the 4 taps of every output pixel fall on
    at most 3 source pixels. Exactly upsample-then-conv (tests/test_model.py checks it against
    PyTorch's own layers), with no upsampled copy and about half the multiply-adds.
    """

    # 1-D tap sums per output parity: even rows see (w0, w1 + w2, w3) at source offsets
    # (-1, 0, +1), odd rows see (0, w0 + w1, w2 + w3).
    TAPS = ((((1, 0, 0, 0), (0, 1, 1, 0), (0, 0, 0, 1))), (((0, 0, 0, 0), (1, 1, 0, 0), (0, 0, 1, 1))))

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, 4, 4))
        self.bias = nn.Parameter(torch.empty(c_out))
        reference = nn.Conv2d(c_in, c_out, 4)  # PyTorch's default initialisation
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            self.bias.copy_(reference.bias)
        self.register_buffer("taps", torch.tensor(self.TAPS, dtype=torch.float32), persistent=False)

    def kernel(self) -> Tensor:
        """The four phases' 3x3 kernels as one conv weight, (4 O, I, 3, 3)."""
        O, I = self.weight.shape[:2]
        kernel = torch.einsum("paj,qbl,oijl->opqiab", self.taps, self.taps, self.weight)  # (O, 2, 2, I, 3, 3)
        return kernel.reshape(4 * O, I, 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.kernel(), self.bias.repeat_interleave(4), padding=1)  # (B, 4 O, H, W)
        return F.pixel_shuffle(y, 2)                                # (B, O, 2H, 2W)


def up_conv(cfg: ModelConfig, c_in: int, c_out: int, size: int, act: type[nn.Module] | None,
            ln: bool = True) -> nn.Sequential:
    """up-conv: size -> 2 size (see UpConv)."""
    layers: list[nn.Module] = [UpConv(c_in, c_out)]
    if ln:
        layers.append(layer_norm(cfg, (c_out, 2 * size, 2 * size)))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class PerImageStandardize(nn.Module):
    """(x - mean) / std per image (NEM_SPEC.md §3), flying MNIST's input normalisation.

    ``floor=False``: no floor on std, as the authors' InputNormalizationWrapper (tf.nn.moments).
    ``floor=True``: std floored at 1/sqrt(D), as tf.image.per_image_standardization.
    """

    def __init__(self, floor: bool):
        super().__init__()
        self.floor = floor

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)                                        # (N, D)
        centred = flat - flat.mean(1, keepdim=True)                # (N, D)
        std = centred.square().mean(1, keepdim=True).sqrt()        # (N, 1)
        # Without the floor, clamp at the smallest normal float: a no-op for every std > 0 (the
        # square root of the smallest positive variance is ~1e-23 in fp32), but an all-equal
        # image (centred = 0, std = 0) gives 0 where the authors' 0 / 0 gave NaN.
        floor = 1.0 / math.sqrt(flat.shape[1]) if self.floor else torch.finfo(std.dtype).tiny
        return (centred / std.clamp_min(floor)).view_as(x)


def make_networks(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int, nn.Module]:
    """(encoder, encoder output size, decoder) of the data set's network (§3 table)."""
    S, Z = image_size, cfg.hidden
    if cfg.network == "static_fc":
        D = S * S
        return nn.Flatten(), D, nn.Sequential(nn.Linear(Z, D), nn.Unflatten(1, (1, S, S)))
    if cfg.network == "flying_shapes_conv":
        s4 = S // 4
        encoder = nn.Sequential(                                   # (N, 1, S, S) -> (N, 512)
            conv(cfg, 1, 32, S, nn.ELU), conv(cfg, 32, 64, S // 2, nn.ELU),
            nn.Flatten(), fc(cfg, 64 * s4 * s4, 512, nn.ELU))
        decoder = nn.Sequential(                                   # (N, Z) -> (N, 1, S, S)
            fc(cfg, Z, 512, nn.ReLU), fc(cfg, 512, 64 * s4 * s4, nn.ReLU), nn.Unflatten(1, (64, s4, s4)),
            up_conv(cfg, 64, 32, s4, nn.ReLU), up_conv(cfg, 32, 1, S // 2, None, ln=False))
        return encoder, 512, decoder
    if cfg.network == "flying_mnist_conv":
        s8 = S // 8
        encoder = nn.Sequential(                                   # (N, 1, S, S) -> (N, 512)
            PerImageStandardize(cfg.input_std_floor),
            conv(cfg, 1, 32, S, nn.ELU), conv(cfg, 32, 64, S // 2, nn.ELU), conv(cfg, 64, 128, S // 4, nn.ELU),
            nn.Flatten(), fc(cfg, 128 * s8 * s8, 512, nn.ELU))
        decoder = nn.Sequential(                                   # (N, Z) -> (N, 1, S, S)
            fc(cfg, Z, 512, nn.ReLU), fc(cfg, 512, 128 * s8 * s8, nn.ReLU), nn.Unflatten(1, (128, s8, s8)),
            up_conv(cfg, 128, 64, s8, nn.ReLU), up_conv(cfg, 64, 32, S // 4, nn.ReLU),
            up_conv(cfg, 32, 1, S // 2, None, ln=False))
        return encoder, 512, decoder
    raise ValueError(f"unknown network {cfg.network!r}")


def tf_init_(module: nn.Module) -> None:
    """Re-draw every fc and conv weight glorot-uniform and zero every bias, in place: the TF 1
    defaults of the authors' layers (slim's and get_variable's), NEM_SPEC.md §3.

    Why here and not in the builders: the layers are built with PyTorch's own initialisation,
    which ``init: torch`` keeps draw for draw (the same seed gives the same weights as before the
    option existed); ``init: tf`` re-draws them all in this one place. The cells then set the two
    parameters TF drew differently: RNN-EM's W_x / W_h (one joined range) and N-EM's step size.
    Glorot's fans of a conv weight (O, I, kh, kw), UpConv's included, are I*kh*kw and O*kh*kw,
    as TF's. LayerNorm gains start at 1 and biases at 0 under both inits.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, UpConv)):
                nn.init.xavier_uniform_(m.weight)                  # U(-a, a), a = sqrt(6 / (fan_in + fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
