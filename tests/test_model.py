"""The EM machinery against hand computations (NEM_SPEC.md §1-3)."""

import math

import pytest
import torch

from nem_study.config import RunConfig
from nem_study.model import NEM, NEMCell, e_step, em_loss


def cfg_for(name="flying_shapes", **model):
    return RunConfig(data={"name": name}, model=model)


@pytest.mark.parametrize("pixel", ["bernoulli", "gaussian"])
def test_e_step_sums_to_one_and_matches_the_ratio(pixel):
    torch.manual_seed(0)
    x = (torch.rand(2, 1, 5, 5) > 0.5).float() if pixel == "bernoulli" else torch.rand(2, 1, 5, 5)
    psi = torch.rand(2, 3, 1, 5, 5)
    gamma = e_step(x, psi, pixel, 0.25)
    assert torch.allclose(gamma.sum(1), torch.ones(2, 1, 5, 5), atol=1e-6)
    # the plain ratio P(x|psi_k) / sum_j P(x|psi_j) of §1.3
    xk = x.unsqueeze(1)
    if pixel == "bernoulli":
        lik = xk * psi + (1 - xk) * (1 - psi)
    else:
        lik = torch.exp(-0.5 * ((xk - psi) / 0.25) ** 2)
    assert torch.allclose(gamma, lik / lik.sum(1, keepdim=True), atol=1e-5)


def test_e_step_is_stable_for_extreme_predictions():
    x = torch.ones(1, 1, 1, 2)
    psi = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1).expand(1, 2, 1, 1, 2)
    gamma = e_step(x, psi, "bernoulli", 0.25)
    assert torch.isfinite(gamma).all()
    assert gamma[0, 1].min() > 0.999


def test_bernoulli_loss_terms_equal_hand_computed_values():
    cfg = cfg_for().model
    target = torch.tensor([[[[1.0, 0.0]]]])                      # (B=1, C=1, H=1, W=2)
    psi = torch.tensor([0.8, 0.3, 0.6, 0.1]).view(1, 2, 1, 1, 2)  # (B, K=2, C, H, W)
    gamma = torch.tensor([0.7, 0.4, 0.3, 0.6]).view(1, 2, 1, 1, 2)
    intra, inter = em_loss(target, psi, gamma, cfg)
    want_intra = 0.7 * -math.log(0.8) + 0.4 * -math.log(1 - 0.3) + 0.3 * -math.log(0.6) + 0.6 * -math.log(0.9)
    want_inter = 0.3 * -math.log(0.2) + 0.6 * -math.log(0.7) + 0.7 * -math.log(0.4) + 0.4 * -math.log(0.9)
    assert intra.item() == pytest.approx(want_intra, rel=1e-6)
    assert inter.item() == pytest.approx(want_inter, rel=1e-6)


def test_gaussian_loss_terms_equal_hand_computed_values_and_mean_over_batch():
    cfg = cfg_for("flying_mnist", loss_sigma=0.5).model
    target = torch.tensor([0.2, 0.9]).view(2, 1, 1, 1)           # (B=2, C, H, W=1)
    psi = torch.tensor([0.1, 0.4, 0.8, -0.2]).view(2, 2, 1, 1, 1)
    gamma = torch.tensor([0.25, 0.75, 0.5, 0.5]).view(2, 2, 1, 1, 1)
    intra, inter = em_loss(target, psi, gamma, cfg)
    const = math.log(0.5) + 0.5 * math.log(2 * math.pi)
    nll = lambda x, m: 0.5 * ((x - m) / 0.5) ** 2 + const  # noqa: E731
    want_intra = (0.25 * nll(0.2, 0.1) + 0.75 * nll(0.2, 0.4) + 0.5 * nll(0.9, 0.8) + 0.5 * nll(0.9, -0.2)) / 2
    want_inter = (0.75 * 0.01 / 2 + 0.25 * 0.16 / 2 + 0.5 * 0.64 / 2 + 0.5 * 0.04 / 2) / 2
    assert intra.item() == pytest.approx(want_intra, rel=1e-6)
    assert inter.item() == pytest.approx(want_inter, rel=1e-6)


def test_gamma_gradient_stop_blocks_the_gradient_through_gamma():
    torch.manual_seed(0)
    x = (torch.rand(1, 1, 4, 4) > 0.5).float()
    psi = torch.rand(1, 3, 1, 4, 4, requires_grad=True)
    for mode, blocked in [("stop", True), ("flow", False)]:
        cfg = cfg_for(gamma_gradient=mode).model
        gamma = e_step(x, psi, "bernoulli", 0.25)
        g = gamma.detach() if cfg.gamma_gradient == "stop" else gamma
        intra, inter = em_loss(x, psi, g, cfg)
        # the part of d loss / d psi that goes through gamma: total minus the direct part
        total = torch.autograd.grad(intra + inter, psi, retain_graph=True)[0]
        direct = torch.autograd.grad(sum(em_loss(x, psi, gamma.detach(), cfg)), psi)[0]
        through_gamma = (total - direct).abs().max().item()
        assert (through_gamma < 1e-7) == blocked, (mode, through_gamma)


def test_model_gamma_gradient_option_changes_the_gradient():
    torch.manual_seed(0)
    x = (torch.rand(3, 2, 1, 28, 28) > 0.7).float()
    grads = {}
    for mode in ["stop", "flow"]:
        cfg = RunConfig(data={"name": "flying_shapes", "frames": 4}, model={"gamma_gradient": mode})
        torch.manual_seed(1)
        model = NEM(cfg.model, 28)
        out = model(x, x, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads[mode] = model.cell.W_h.weight.grad.clone()
    assert not torch.allclose(grads["stop"], grads["flow"])


def test_nem_cell_is_one_gradient_step_on_the_log_likelihood():
    """z' = z + eta * d/dz sum_i gamma_i log P(x_i | psi(z)), psi(z) = s(s(z) W^T) (§1.2)."""
    cfg = cfg_for("static_shapes", kind="nem", hidden=20).model
    torch.manual_seed(0)
    cell = NEMCell(cfg, 6)
    with torch.no_grad():
        cell.eta.fill_(0.7)
    x = (torch.rand(5, 1, 6, 6) > 0.5).float()
    gamma = torch.rand(5, 1, 6, 6)
    z = torch.randn(5, 20, requires_grad=True)
    psi = torch.sigmoid(torch.sigmoid(z) @ cell.W.T).view(5, 1, 6, 6)
    loglik = (gamma * (x * torch.log(psi) + (1 - x) * torch.log(1 - psi))).sum()
    (grad,) = torch.autograd.grad(loglik, z)
    z_next, logits = cell(gamma * (x - psi.detach()), z.detach())
    assert torch.allclose(z_next, z.detach() + 0.7 * grad, atol=1e-5)
    assert torch.allclose(logits, (torch.sigmoid(z_next) @ cell.W.T).view(5, 1, 6, 6))


@pytest.mark.parametrize("name,kind", [("static_shapes", "nem"), ("static_shapes", "rnn_em"),
                                       ("flying_shapes", "rnn_em"), ("flying_mnist", "rnn_em")])
def test_every_network_runs_and_returns_the_documented_shapes(name, kind):
    cfg = RunConfig(data={"name": name, "frames": 1 if name == "static_shapes" else 4},
                    model={"kind": kind, "em_steps": 3})
    S = cfg.data.image_size
    model = NEM(cfg.model, S)
    x = torch.rand(3, 2, 1, S, S)
    out = model(x, x, k=4, collect=True)
    assert out.gamma.shape == (3, 2, 4, 1, S, S)
    assert out.psi.shape == (3, 2, 4, 1, S, S)
    assert torch.allclose(out.gamma.sum(2), torch.ones(3, 2, 1, S, S), atol=1e-5)
    assert out.intra.shape == (3,) and torch.isfinite(out.loss)
    out.loss.backward()


def test_loss_step_weights_last_uses_only_the_final_step():
    x = (torch.rand(4, 2, 1, 28, 28) > 0.7).float()
    losses = {}
    for w in ["all", "last"]:
        cfg = RunConfig(data={"name": "flying_shapes", "frames": 5}, model={"loss_step_weights": w})
        torch.manual_seed(0)
        out = NEM(cfg.model, 28)(x, x, generator=torch.Generator().manual_seed(0))
        losses[w] = (out.loss.item(), (out.intra + out.inter).tolist())
    assert losses["all"][0] == pytest.approx(sum(losses["all"][1]), rel=1e-5)
    assert losses["last"][0] == pytest.approx(losses["last"][1][-1], rel=1e-5)


def test_initial_gamma_is_normalised_and_k1_is_one():
    cfg = cfg_for().model
    model = NEM(cfg, 28)
    x = torch.rand(2, 1, 28, 28)
    _, psi, gamma = model.init_state(x, 3)
    assert torch.allclose(gamma.sum(1), torch.ones(2, 1, 28, 28), atol=1e-6)
    assert (psi == 0).all()
    _, _, gamma1 = model.init_state(x, 1)
    assert torch.allclose(gamma1, torch.ones_like(gamma1))


def test_up_conv_equals_upsample_then_same_padded_conv():
    """UpConv's sub-pixel form against PyTorch's upsample + TF-SAME-padded 4x4 conv."""
    from torch.nn import functional as F

    from nem_study.model import UpConv

    torch.manual_seed(0)
    layer = UpConv(5, 3).double()
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    ours = layer(x)
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    reference = F.conv2d(F.pad(up, (1, 2, 1, 2)), layer.weight, layer.bias)
    assert ours.shape == reference.shape == (2, 3, 14, 12)
    assert torch.allclose(ours, reference, atol=1e-12)
    g = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * g).sum(), (x, layer.weight, layer.bias))
    want = torch.autograd.grad((reference * g).sum(), (x, layer.weight, layer.bias))
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("name", ["flying_shapes", "flying_mnist"])
def test_bf16_autocast_gives_the_fp32_loss_and_gradients_within_tolerance(name):
    """train.precision = bf16: the same loss within 1e-2 relative, gradients within 5e-2
    relative (norm of the difference) and pointing the same way (cosine > 0.999)."""
    from nem_study.train import autocast, corrupt, to_steps

    cfg = cfg_for(name, k=2)
    S = cfg.data.image_size
    torch.manual_seed(0)
    model = NEM(cfg.model, S)
    frames = torch.rand(4, 6, S, S)
    frames = frames if cfg.data.grey else (frames > 0.85).float()
    inputs, targets = to_steps(frames, 5, False)
    x = corrupt(inputs, cfg.noise, torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with autocast(torch.device("cpu"), precision):
            out = model(x, targets, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        assert out.loss.dtype == torch.float32
        losses[precision] = out.loss.item()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    diff = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert 0 < diff < 5e-2 and cosine > 0.999, (diff, cosine)   # 0: autocast did not run in bf16


def test_precision_auto_is_bf16_only_on_a_cpu_with_native_bf16():
    """The fast path is the default where it was measured faster, and fp32/bf16 switch it."""
    from nem_study.train import resolve_precision

    cpu = torch.device("cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"   # GPU: bf16 measured no faster


def test_compiled_cell_gives_the_eager_loss_and_gradients():
    """train.compile: torch.compile of the M-step cell changes the speed, not the numbers
    (loss within 1e-5 relative, gradients within 1e-4 of their norm); checkpoint keys unchanged."""
    from nem_study.train import corrupt, to_steps

    cfg = cfg_for("static_shapes", k=3)
    torch.manual_seed(0)
    eager, compiled = NEM(cfg.model, 28), NEM(cfg.model, 28)
    compiled.load_state_dict(eager.state_dict())
    compiled.cell.compile(dynamic=False)  # as train.compile does
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    frames = (torch.rand(4, 2, 28, 28) > 0.85).float()
    inputs, targets = to_steps(frames, 4, True)
    x = corrupt(inputs, cfg.noise, torch.Generator().manual_seed(1))
    out = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        loss = model(x, targets, generator=torch.Generator().manual_seed(2)).loss
        loss.backward()
        out[name] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    assert out["compiled"][0] == pytest.approx(out["eager"][0], rel=1e-5)
    diff = (out["compiled"][1] - out["eager"][1]).norm() / out["eager"][1].norm()
    assert diff < 1e-4, diff
