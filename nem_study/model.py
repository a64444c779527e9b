"""Neural Expectation Maximization: N-EM and RNN-EM, read top to bottom.

An image x is a mixture of K components. Each component k keeps a representation theta_k
(a recurrent state), a shared network maps it to pixel parameters psi_k, and one EM step is

    1. input_k  = gamma_k * (x_tilde - psi_k)            what component k fails to explain (§1.1)
    2. M-step:   theta_k, psi_k <- cell(input_k, theta_k)  N-EM gradient cell or RNN-EM   (§1.2)
    3. E-step:   gamma_k = P(x | psi_k) / sum_j P(x | psi_j)  against the clean target      (§1.3)
    4. loss:     intra-cluster NLL + w_inter * inter-cluster KL                           (§2)

All section numbers refer to ``NEM_SPEC.md``. The K components share weights, so K is folded
into the batch: every network sees ``B * K`` images. Shapes below use B batch, K components,
C channels (1), H x W pixels, D = C * H * W, Z the recurrent size.

Initialisation and normalisation follow the authors' TF 1 code by default (§3: ``init: tf``,
``layer_norm_affine: channel``, ``layer_norm_eps: 1e-12``, no input std floor); the encoders
and decoders and that initialisation live in ``nem_study.networks``. PyTorch's layer defaults
remain selectable and give the same weights as before the option existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nem_study.config import ModelConfig
from nem_study.networks import layer_norm, make_networks, tf_init_

EPS = 1e-6  # clip for Bernoulli means (NEM_SPEC.md §2)
LOGIT_CLIP = math.log((1 - EPS) / EPS)  # the same clip on the logits: sigmoid(+-13.8) = 1 - EPS, EPS


# ----------------------------------------------------------------------------------------
# M-step cells (§1.2). Each maps (input_k, state_k) -> (new state_k, psi_k logits or means).


class RNNEMCell(nn.Module):
    """RNN-EM: z = W_x enc(input) + W_h h + b;  h' = sigmoid(z);  psi = dec(sigmoid(LN(z)))."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        self.encoder, n_enc, self.decoder = make_networks(cfg, image_size)
        Z = cfg.hidden
        self.W_x = nn.Linear(n_enc, Z)
        self.W_h = nn.Linear(Z, Z, bias=False)
        self.ln = layer_norm(cfg, (Z,)) if cfg.layer_norm else None  # one gain per feature
        if cfg.init == "tf":
            tf_init_(self)
            # TF's BasicRNNCell has ONE kernel over [input, h] -> Z: draw it, then split it, so
            # W_x and W_h share its glorot range sqrt(6 / (n_enc + 2 Z)) (§3); the bias is 0.
            kernel = nn.init.xavier_uniform_(torch.empty(Z, n_enc + Z))  # (Z, n_enc + Z)
            with torch.no_grad():
                self.W_x.weight.copy_(kernel[:, :n_enc])
                self.W_h.weight.copy_(kernel[:, n_enc:])

    def forward(self, inputs: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        z = self.W_x(self.encoder(inputs)) + self.W_h(h)           # (B*K, Z)
        h = torch.sigmoid(z)                                       # (B*K, Z)
        o = torch.sigmoid(self.ln(z)) if self.ln is not None else h  # LN on the output path only
        return h, self.decoder(o)                                  # (B*K, C, H, W) pre-activation


class NEMCell(nn.Module):
    """N-EM: one generalised-EM gradient step on theta with tied weights (§1.2).

    z' = z + eta * s(z)(1 - s(z)) * (delta @ W),  psi = s(s(z') @ W^T),  theta = s(z).
    With delta = gamma (x - psi) this is z + eta * dlogP/dz for Bernoulli pixels.
    """

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        D = image_size * image_size
        self.image_size = image_size
        self.W = nn.Parameter(torch.empty(D, cfg.hidden))          # (D, Z), no bias
        nn.init.xavier_uniform_(self.W)  # glorot under both inits, as TF's bias-free fully_connected
        # the single learned step size: TF's (1, 1) variable, glorot-uniform, so U(-sqrt 3, sqrt 3)
        # and possibly negative, under init: tf (§3); 1.0 under init: torch
        eta = nn.init.xavier_uniform_(torch.empty(1, 1))[0, 0] if cfg.init == "tf" else torch.tensor(1.0)
        self.eta = nn.Parameter(eta)                               # ()

    def forward(self, delta: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(z)                                       # (B*K, Z)
        z = z + self.eta * s * (1 - s) * (delta.flatten(1) @ self.W)  # (B*K, Z)
        logits = torch.sigmoid(z) @ self.W.T                       # (B*K, D)
        return z, logits.view(-1, 1, self.image_size, self.image_size)


# ----------------------------------------------------------------------------------------
# Pixel likelihoods, E-step and loss (§1.3, §2)


def pixel_terms(target: Tensor, out: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per pixel, from the decoder output ``out``: log P(x | psi_k) for the E-step, log P(x | psi_k)
    for the intra-cluster loss, and KL(P(x) || P(x | psi_k)) for the inter-cluster loss (§1.3, §2).

    Bernoulli: psi = sigmoid(o) clipped to [EPS, 1 - EPS] is o clipped to +-logit(1 - EPS), and
    with log psi = log sigmoid(o) and log(1 - psi) = log psi - o every term is a pass or two over
    (B, K, C, H, W), where written in psi they took ten (BENCHMARKS.md). The pixel prior P(x) is a
    Bernoulli(0), KL = -log(1 - psi), or N(0, 1), KL = psi^2 / 2. Gaussian: ``e_sigma`` for the
    E-step, ``loss_sigma`` for the loss (§2).
    """
    x = target.unsqueeze(1)                                        # (B, 1, C, H, W)
    if cfg.pixel == "bernoulli":
        o = out.clamp(-LOGIT_CLIP, LOGIT_CLIP)                     # (B, K, C, H, W)
        log_psi = torch.log(torch.sigmoid(o))                      # (B, K, C, H, W)
        ll = log_psi - (1 - x) * o                                 # x log psi + (1 - x) log(1 - psi)
        return ll, ll, o - log_psi                                 # KL = -log(1 - psi)

    def gauss(s: float) -> Tensor:                                 # (B, K, C, H, W)
        return -0.5 * ((x - out) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

    ll = gauss(cfg.loss_sigma)
    return ll if cfg.e_sigma == cfg.loss_sigma else gauss(cfg.e_sigma), ll, 0.5 * out**2


def e_step(log_lik: Tensor) -> Tensor:
    """gamma_k = P(x|psi_k) / sum_j P(x|psi_j), in log space (§1.3, uniform prior).

    log_lik: (B, K, C, H, W) log P(x | psi_k) per pixel -> gamma (B, K, C, H, W)
    """
    return torch.softmax(log_lik, dim=1)


def em_loss(log_lik: Tensor, kl: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """(intra, inter) of §2: sums over pixels and K, means over the batch.

    intra = sum gamma * -log P(x | psi),  inter = sum (1 - gamma) * KL(P(x) || P(x | psi));
    all three (B, K, C, H, W), from ``pixel_terms``.
    """
    B = log_lik.shape[0]
    intra = -(gamma * log_lik).sum() / B
    inter = ((1 - gamma) * kl).sum() / B
    return intra, inter


# ----------------------------------------------------------------------------------------
# The EM loop


@dataclass
class EMOutput:
    loss: Tensor            # scalar: the weighted sum of per-step losses
    intra: Tensor           # (T,) per-step intra-cluster loss
    inter: Tensor           # (T,) per-step inter-cluster loss
    gamma: Tensor | None    # (T, B, K, C, H, W) soft assignments, when collected
    psi: Tensor | None      # (T, B, K, C, H, W) component predictions, when collected


class NEM(nn.Module):
    """N-EM (``kind: nem``) or RNN-EM (``kind: rnn_em``) unrolled over T steps."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.cell = NEMCell(cfg, image_size) if cfg.kind == "nem" else RNNEMCell(cfg, image_size)

    def pixel_params(self, out: Tensor) -> Tensor:
        """psi from the decoder output: Bernoulli means (sigmoid) or Gaussian means (linear)."""
        return torch.sigmoid(out) if self.cfg.pixel == "bernoulli" else out

    def m_step(self, delta: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """theta_k, psi_k <- cell(input_k, theta_k) (§1.2): N-EM's gradient step or RNN-EM's cell,
        all K components at once (folded into the batch). Returns the states and the decoder
        output (Bernoulli logits or Gaussian means), from which ``pixel_params`` gives psi.

        delta: (B, K, C, H, W) the inputs gamma_k (x_tilde - psi_k);  h: (B*K, Z) the states
        """
        B, k = delta.shape[:2]
        h, out = self.cell(delta.flatten(0, 1), h)                # (B*K, Z), (B*K, C, H, W)
        return h, out.float().view(B, k, *out.shape[1:])          # fp32 likelihoods under autocast

    def init_state(self, x: Tensor, k: int, generator: torch.Generator | None = None, noise: Tensor | None = None):
        """h = 0, psi_0 = 0 or the per-image median, gamma_0 = |N(0, 1)| normalised over K (§1).

        ``noise``: the N(0, 1) draw of gamma_0, (B, K, C, H, W), when the caller makes it (under
        ``vmap``, which cannot draw from a generator); else it is drawn here from ``generator``.
        """
        B = x.shape[0]
        h = x.new_zeros(B * k, self.cfg.hidden)                      # (B*K, Z)
        if self.cfg.psi_init == "median":
            med = x.flatten(1).median(dim=1).values.view(B, 1, 1, 1, 1)
            psi = med.expand(B, k, *x.shape[1:]).clone()             # (B, K, C, H, W)
        else:
            psi = x.new_zeros(B, k, *x.shape[1:])                    # (B, K, C, H, W)
        if noise is None:
            noise = torch.randn(psi.shape, generator=generator, device=x.device)
        noise = noise.abs()                                          # (B, K, C, H, W)
        gamma = noise / noise.sum(1, keepdim=True).clamp_min(1e-12)  # (B, K, C, H, W)
        return h, psi, gamma

    def em_iteration(self, x_tilde: Tensor, target: Tensor, h: Tensor, psi: Tensor,
                     gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One EM iteration (§1): the inputs, the M-step, the E-step and this step's loss.

        x_tilde, target: (B, C, H, W);  h: (B*K, Z);  psi, gamma: (B, K, C, H, W)
        -> h, psi, gamma and the scalars intra, inter. ``train.compile`` compiles this function:
        its pixel-wise passes then run fused (BENCHMARKS.md).
        """
        cfg = self.cfg
        g = gamma.detach() if cfg.gamma_gradient == "stop" else gamma
        x_tilde = x_tilde.unsqueeze(1)                                # (B, 1, C, H, W)
        error = x_tilde - psi if cfg.input_sign == "x_minus_psi" else psi - x_tilde
        h, out = self.m_step(g * error, h)                            # (B*K, Z), (B, K, C, H, W)
        psi = self.pixel_params(out)                                  # (B, K, C, H, W)
        ll_e, ll, kl = pixel_terms(target, out, cfg)                  # (B, K, C, H, W) each
        gamma = e_step(ll_e)                                          # (B, K, C, H, W)
        g = gamma.detach() if cfg.gamma_gradient == "stop" else gamma
        intra, inter = em_loss(ll, kl, g)                             # (), ()
        return h, psi, gamma, intra, inter

    def compile_iteration(self, mode: str = "default") -> None:
        """``train.compile``: torch.compile ``em_iteration`` in place (the weights and checkpoint
        keys stay eager's); static shapes, because a dynamic-shape recompile of the flying-MNIST
        cell fails in torch 2.13's inductor."""
        self.em_iteration = torch.compile(self.em_iteration, mode=mode, dynamic=False)

    def forward(self, inputs: Tensor, targets: Tensor, k: int | None = None,
                generator: torch.Generator | None = None, collect: bool = False,
                noise: Tensor | None = None) -> EMOutput:
        """Run T EM steps.

        inputs:  (T, B, C, H, W) the noisy x_tilde seen at each step
        targets: (T, B, C, H, W) the clean target of each step (next frame, or the image)
        noise:   (B, K, C, H, W) gamma_0's N(0, 1) draw, or None to draw it from ``generator``
        """
        cfg = self.cfg
        k = k or cfg.k
        T = inputs.shape[0]
        h, psi, gamma = self.init_state(inputs[0], k, generator, noise)
        intra, inter, gammas, psis = [], [], [], []
        for t in range(T):
            h, psi, gamma, l_intra, l_inter = self.em_iteration(inputs[t], targets[t], h, psi, gamma)
            intra.append(l_intra)
            inter.append(l_inter)
            if collect:
                gammas.append(gamma.detach())
                psis.append(psi.detach())
        intra_t, inter_t = torch.stack(intra), torch.stack(inter)    # (T,), (T,)
        per_step = intra_t + cfg.w_inter * inter_t                   # (T,)
        loss = per_step.sum() if cfg.loss_step_weights == "all" else per_step[-1]
        return EMOutput(loss, intra_t, inter_t,
                        torch.stack(gammas) if collect else None,
                        torch.stack(psis) if collect else None)
