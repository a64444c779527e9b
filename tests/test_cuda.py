"""The GPU path (``train.cuda_graph``): a training step replayed as a CUDA graph gives eager's
numbers. Skipped where torch sees no CUDA device (CI); run on a GPU machine by ``bench/gpu.sh``."""

from __future__ import annotations

import pytest
import torch

from conftest import make_splits
from nem_study.batches import corrupt, gamma0_noise, to_steps
from nem_study.config import RunConfig
from nem_study.model import NEM
from nem_study.step import GraphedStep, train_step
from nem_study.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NETWORKS = {
    "static shapes, N-EM": {"data": {"name": "static_shapes"}, "model": {"kind": "nem"}},
    "static shapes, RNN-EM": {"data": {"name": "static_shapes"}},
    "flying shapes, RNN-EM": {"data": {"name": "flying_shapes"}},
}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full fp32 convs, so that the two paths differ only by summation order."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", NETWORKS)
def test_the_graphed_step_gives_the_eager_losses_gradients_and_weights(name):
    """8 Adam steps on 8 different batches, eager vs ``GraphedStep`` (3 eager warm-up steps, the
    capture, 4 replays), from the same weights. Every step's loss agrees within 1e-4 relative;
    the last step's gradients and the final weights within 1e-3 of their norms."""
    cfg = RunConfig.model_validate(NETWORKS[name] | {"train": {"batch_size": 8}})
    S, F, K = cfg.data.image_size, cfg.data.frames, cfg.model.k
    dev = torch.device("cuda")
    torch.manual_seed(0)
    eager = NEM(cfg.model, S).to(dev)
    graphed = NEM(cfg.model, S).to(dev)
    graphed.load_state_dict(eager.state_dict())
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3)
    opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
    step = GraphedStep(lambda *batch, cache: train_step(graphed, opt_g, *batch, "fp32", cache))
    gen = torch.Generator(dev).manual_seed(1)
    for i in range(8):
        frames = (torch.rand(8, F, S, S, generator=gen, device=dev) > 0.85).float()
        inputs, targets = to_steps(frames, cfg.steps, cfg.data.is_static)
        x_tilde = corrupt(inputs, cfg.noise, gen)
        noise = gamma0_noise(inputs, K, gen)
        loss_e = train_step(eager, opt_e, x_tilde, targets, noise, "fp32").loss.item()
        loss_g = step(x_tilde, targets, noise).loss.item()
        assert loss_g == pytest.approx(loss_e, rel=1e-4), (i, loss_g, loss_e)
    assert step.graph is not None  # the last steps were replays

    def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
        return ((a - b).norm() / b.norm()).item()

    assert rel([p.grad for p in graphed.parameters()], [p.grad for p in eager.parameters()]) < 1e-3
    assert rel(list(graphed.parameters()), list(eager.parameters())) < 1e-3


def test_fit_on_a_gpu_with_and_without_the_graph(tmp_path):
    """``fit`` with ``train.cuda_graph`` true (the default) and false: the same per-epoch losses
    (1e-4 relative), and a run resumed from the graphed run's epoch-1 checkpoint continues it."""
    base = {"data": {"name": "static_shapes", "train": 96, "valid": 32, "test": 32},
            "train": {"batch_size": 16, "max_epochs": 2, "valid_samples": 32, "device": "cuda"}}
    splits = make_splits(RunConfig.model_validate(base))
    runs = {}
    for graph in (True, False):
        cfg = RunConfig.model_validate(base | {"train": base["train"] | {
            "cuda_graph": graph, "checkpoint_dir": str(tmp_path / str(graph))}})
        runs[graph] = fit(cfg, splits, test=False)
    history = {g: torch.load(tmp_path / str(g) / "last.pt", weights_only=False)["history"] for g in runs}
    for a, b in zip(history[True], history[False]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)

    cfg = RunConfig.model_validate(base | {"train": base["train"] | {"max_epochs": 3, "checkpoint_dir": str(tmp_path / "r")}})
    resumed = fit(cfg, splits, resume=tmp_path / "True" / "last.pt", test=False)
    assert resumed["epochs"] == 3
