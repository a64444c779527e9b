"""One training run: ``fit(config)``.

Adam, early stopping on the validation loss, best and last checkpoints, resume, and a final
test evaluation (NEM_SPEC.md §3, §5). It reports through a plain callback
``report(metrics: dict, checkpoint_dir: Path | None)`` and imports neither Ray nor MLflow.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nem_study.capacity import DiskFull, is_disk_full
from nem_study.config import InputError, NoiseConfig, RunConfig
from nem_study.data import BACKGROUND, OVERLAP, Split
from nem_study.inputs import human
from nem_study.metrics import ami_matrix, bce_upper_bound
from nem_study.model import NEM, EMOutput

CHECKPOINT_FORMAT = "nem-study-checkpoint/1"
Report = Callable[[dict[str, Any], Path | None], None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message says where."""


# ----------------------------------------------------------------------------------------
# Batches: frames -> (inputs, targets), noise


def to_steps(frames: torch.Tensor, steps: int, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean frames (B, F, H, W) -> step-major inputs and targets, each (T, B, 1, H, W).

    Sequences predict the next frame: input frame t, target frame t + 1 (§1.3).
    Static data repeat one image for every EM step, and the target is the image itself.
    """
    x = frames.transpose(0, 1).unsqueeze(2)                       # (F, B, 1, H, W)
    if static:
        x0 = x[:1].expand(steps, *x.shape[1:])                    # (T, B, 1, H, W)
        return x0, x0
    if x.shape[0] < steps + 1:
        raise InputError(f"the data have {x.shape[0]} frames, {steps} steps need {steps + 1}")
    return x[:steps], x[1:steps + 1]


def target_labels(labels: np.ndarray, steps: int, static: bool) -> np.ndarray:
    """Label maps (B, F, H, W) of each step's target, (B, T, H, W)."""
    return np.repeat(labels[:, :1], steps, axis=1) if static else labels[:, 1:steps + 1]


def corrupt(x: torch.Tensor, noise: NoiseConfig, generator: torch.Generator) -> torch.Tensor:
    """x_tilde, drawn fresh for every step (§3): bitflip x^n or masked uniform m u + (1-m) x."""
    if noise.kind == "none" or noise.prob == 0:
        return x
    m = torch.rand(x.shape, generator=generator, device=x.device) < noise.prob
    if noise.kind == "bitflip":
        return torch.where(m, 1.0 - x, x)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(m, u, x)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


# ----------------------------------------------------------------------------------------
# One optimisation step: eager, or replayed as a CUDA graph


def gamma0_noise(inputs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """gamma_0's N(0, 1) draw for a batch of inputs (T, B, C, H, W): (B, K, C, H, W).

    Drawn by the caller, after ``corrupt``, so that the step itself holds no random draws
    (a CUDA graph replays fixed kernels) and eager and graphed training see the same numbers.
    """
    return torch.randn((inputs.shape[1], k, *inputs.shape[2:]), generator=generator, device=inputs.device)


def train_step(model: NEM, optimizer: torch.optim.Optimizer, x_tilde: torch.Tensor, targets: torch.Tensor,
               noise: torch.Tensor, precision: str, cache: bool = True) -> EMOutput:
    """Forward over all EM steps, backward, Adam: one batch."""
    with autocast(x_tilde.device, precision, cache):
        out = model(x_tilde, targets, noise=noise)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    # Detached: the spent autograd graph is freed now, not when the next step replaces ``out``.
    return EMOutput(out.loss.detach(), out.intra.detach(), out.inter.detach(), None, None)


class GraphedStep:
    """A training step captured once as a CUDA graph and then replayed (``train.cuda_graph``).

    These networks are small: an eager step on a GPU spends its time launching a few thousand
    tiny kernels, one EM step after another. A replay launches them all at once. ``step(*inputs,
    cache=...)`` is the eager step (forward, backward, optimiser; ``train_step``). The first
    ``warmup`` calls run it eagerly on a side stream, as capture requires (cuDNN and cuBLAS set
    up, Adam's state created); the next call captures it and replays. Each later call copies its
    inputs into the captured tensors. The optimiser must be built with ``capturable=True``.
    """

    def __init__(self, step: Callable[..., Any], warmup: int = 3):
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step(*inputs, cache=True)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.inputs = [t.clone() for t in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels; the replay below runs them
                self.out = self.step(*self.inputs, cache=False)  # autocast must not cache in a graph
        else:
            for static, new in zip(self.inputs, inputs):
                static.copy_(new)
        self.graph.replay()
        return self.out


# ----------------------------------------------------------------------------------------
# Evaluation


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 where it was measured faster (a CPU
    with AVX512-BF16 or AMX: 1.1-1.8x, BENCHMARKS.md), fp32 elsewhere (on an H100 bf16 was
    0.89-1.03x fp32: these networks are too small for the tensor cores to matter)."""
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "fp32"
    try:  # native bf16 dot products; emulated bf16 (plain AVX2/AVX-512) is slower than fp32
        fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # another torch version
        fast = False
    return "bf16" if fast else "fp32"


def autocast(device: torch.device, precision: str, cache: bool = True) -> torch.autocast:
    """bf16 autocast of the networks' convs and matmuls (``train.precision``); fp32: a no-op.
    ``cache=False`` inside a CUDA graph capture, which must not keep autocast's weight casts."""
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache)


def component_shares(pred: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Per image, the share of object pixels each component wins, largest first: (B, K).

    A diagnostic for collapse: K = 3 on 3 objects should approach (1/3, 1/3, 1/3) when every
    component takes one object; (0.5, 0.5, 0) says one component is unused.
    """
    onehot = (pred[..., None] == np.arange(k)) & valid[..., None]         # (B, H, W, K)
    counts = onehot.reshape(len(pred), -1, k).sum(1).astype(np.float64)    # (B, K)
    with np.errstate(invalid="ignore"):
        return -np.sort(-counts / counts.sum(1, keepdims=True), axis=1)


@torch.no_grad()
def evaluate(model: NEM, split: Split, cfg: RunConfig, n: int | None = None, *,
             k: int | None = None, steps: int | None = None, static: bool | None = None,
             seed: int = 0, batch_size: int | None = None,
             average_method: str = "max", panel: str | Path | None = None) -> dict[str, Any]:
    """Loss, AMI per step (§5) and the next-step BCE bound of ``model`` on ``split``.

    ``ami`` is the score NEM_SPEC.md §5 reports: the last EM step's AMI on static inputs (static
    data, or a static transfer), the mean over steps on sequences; ``ami_mean`` and ``ami_last``
    are both kept under their own names, and ``ami_score`` says which one ``ami`` is.

    ``k``, ``steps`` and ``static`` override the run's values: the generalisation tests.
    ``static=True`` on a sequence set repeats each sequence's first frame (static transfer).
    ``panel``: also write a PNG of the first sequence's groupings (``plots.grouping_panel``).
    """
    model.eval()
    device = next(model.parameters()).device
    k = k or cfg.model.k
    static = cfg.data.is_static if static is None else static
    steps = steps or cfg.steps
    n = min(n or len(split), len(split))
    bs = batch_size or cfg.train.batch_size
    gen = torch.Generator(device).manual_seed(10_000 + seed)
    loss_sum, bce_sum = 0.0, torch.zeros(steps, dtype=torch.float64)
    amis, shares = [], []
    for lo in range(0, n, bs):
        idx = np.arange(lo, min(lo + bs, n))
        frames, labels = split.batch(idx)
        inputs, targets = to_steps(torch.from_numpy(frames).to(device), steps, static)
        x_tilde = corrupt(inputs, cfg.noise, gen)                 # (T, B, 1, H, W)
        with autocast(device, cfg.train.precision):
            out = model(x_tilde, targets, k=k, generator=gen, collect=True)
        loss_sum += out.loss.item() * len(idx)
        bce = bce_upper_bound(out.psi.flatten(0, 1), targets.flatten(0, 1))  # (T*B,)
        bce_sum += bce.view(steps, -1).sum(1).double().cpu()
        pred = out.gamma.argmax(2).squeeze(2).transpose(0, 1)    # (B, T, H, W)
        true = target_labels(labels, steps, static)               # (B, T, H, W)
        valid = (true != BACKGROUND) & (true != OVERLAP)
        pred = pred.cpu().numpy()
        amis.append(ami_matrix(true, pred, valid, average_method=average_method))
        shares.append(component_shares(pred[:, -1], valid[:, -1], k))
        if panel and lo == 0:
            from nem_study.plots import grouping_panel

            grouping_panel(x_tilde[:, 0, 0].cpu(), out.psi[:, 0, :, 0].cpu(), out.gamma[:, 0, :, 0].cpu(),
                           true[0], panel, title=f"K = {k}, {'static' if static else 'sequence'}, "
                           f"test sequence {idx[0]}")
    model.train()
    ami = np.concatenate(amis)                                    # (N, T)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)           # a step with no objects: NaN
        per_step = np.nanmean(ami, axis=0)                        # (T,)
        q25, q75 = np.nanpercentile(ami, [25, 75], axis=0)        # (T,), (T,) Figure 6's band
    return {
        "loss": loss_sum / n,
        "ami_per_step": [float(a) for a in per_step],
        "ami": float(per_step[-1] if static else np.nanmean(per_step)),
        "ami_mean": float(np.nanmean(per_step)),
        "ami_last": float(per_step[-1]),
        "ami_q25_per_step": [float(a) for a in q25],
        "ami_q75_per_step": [float(a) for a in q75],
        "bce_per_step": [float(b) for b in bce_sum / n],
        "component_shares": [float(c) for c in np.nanmean(np.concatenate(shares), axis=0)],
        "bce_bound": float(bce_sum.mean() / n),
        "n": n, "k": k, "steps": steps, "static": static, "average_method": average_method,
        "ami_score": "last" if static else "mean",
    }


# ----------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and JSON values, loadable with weights_only=True


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write ``state`` to ``path`` whole or not at all: into ``<name>.tmp`` (which the next save
    overwrites, so a killed run leaves at most one), then renamed over ``path``. A full disk is one
    :class:`~nem_study.capacity.DiskFull` error naming ``path``, which still holds the previous checkpoint."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)  # torch reports a failed write as a bare RuntimeError
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())  # some file systems (NFS) report a full disk only here
        tmp.replace(path)  # atomic: a killed run never leaves half a checkpoint
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFull(f"{path}: disk full ({os.strerror(e.errno)}), the checkpoint ({human(buf.tell())}) "
                           f"was not written; {'the previous one is kept' if path.exists() else 'there is none yet'}. "
                           "Free some space there and run again") from None
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint; any problem is an InputError naming the file."""
    import pickle
    from nem_study.inputs import check_checkpoint_file

    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    check_checkpoint_file(path)  # a regular file, not empty, not huge, a zip archive as torch.save writes
    try:
        with warnings.catch_warnings():  # the error below is the one message
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a class: someone else's pickle
        raise InputError(f"{path}: not a nem-study checkpoint (it holds Python objects other than tensors "
                         "and plain data; not loaded, since that would run its code)") from None
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        why = _first_line(e).split(". ")[0]
        raise InputError(f"{path}: not a readable checkpoint, damaged or truncated ({why})") from None
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = (f"a saved {type(ckpt).__name__}" if not isinstance(ckpt, Mapping) else
                 f"format {str(ckpt['format'])[:60]!r}" if "format" in ckpt else "a dict without 'format'")
        raise InputError(f"{path}: not a nem-study checkpoint (expected format {CHECKPOINT_FORMAT!r}, "
                         f"found {found})")
    missing = [key for key in ("config", "model") if key not in ckpt]
    if missing:
        raise InputError(f"{path}: an incomplete checkpoint (no {', '.join(missing)})")
    try:
        ckpt = dict(ckpt)
        ckpt["config"] = RunConfig.model_validate(_with_legacy_choices(ckpt["config"]))
    except Exception as e:
        raise InputError(f"{path}: the checkpoint's config is invalid: {e}") from None
    return ckpt


# A checkpoint stores its resolved config. One written before these options existed trained with
# what is now the alternative (the data and initialisation of NEM_SPEC.md §3-4 became the
# defaults later), so a missing key means that alternative: the checkpoint evaluates as it trained.
LEGACY_CHOICES = {"data": {"sprites": "outline", "motion": "continuous"},
                  "model": {"init": "torch", "layer_norm_affine": "element", "layer_norm_eps": 1e-5,
                            "input_std_floor": True}}


def _with_legacy_choices(config: Any) -> Any:
    if not isinstance(config, Mapping):
        return config
    out = dict(config)
    for section, defaults in LEGACY_CHOICES.items():
        if isinstance(out.get(section), Mapping):
            out[section] = defaults | dict(out[section])
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def load_model(path: str | Path, device: str = "auto") -> tuple[NEM, RunConfig, dict[str, Any]]:
    ckpt = load_checkpoint(path)
    cfg: RunConfig = ckpt["config"]
    model = NEM(cfg.model, cfg.data.image_size)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise InputError(f"{path}: weights do not fit the model of its config ({_first_line(e)})") from None
    return model.to(pick_device(device)), cfg, ckpt


# ----------------------------------------------------------------------------------------
# Training


def fit(cfg: RunConfig, splits: Mapping[str, Split], report: Report | None = None,
        resume: str | Path | None = None, progress: bool = False, init: str | Path | None = None,
        test: bool = True, panel: str | Path | None = None) -> dict[str, Any]:
    """Train until early stopping, max_epochs or the time budget; return test metrics.

    ``splits`` holds "train", "valid" and (with ``test``) "test" (see ``nem_study.data.load``).
    ``resume`` is a checkpoint (file or directory) to continue from, with its optimiser and
    counters; ``init`` one whose weights only start a fresh run (a curriculum's next stage).
    ``panel``: the final test also draws test sequence 0's groupings there (a PNG).
    """
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    model = NEM(cfg.model, cfg.data.image_size).to(device)
    if tc.compile:
        # In place, so checkpoint keys stay eager's; static shapes, because a dynamic-shape
        # recompile of the flying-MNIST cell fails in torch 2.13's inductor.
        model.cell.compile(dynamic=False)
    graphed = tc.cuda_graph and device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, capturable=graphed)
    ckpt_dir = Path(tc.checkpoint_dir) if tc.checkpoint_dir else None
    if ckpt_dir:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    start_epoch, best_loss, best_epoch, history = 1, math.inf, 0, []
    if init is not None and resume is None:
        model.load_state_dict(load_checkpoint(init)["model"])
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"] + 1
        best_loss, best_epoch, history = ckpt["best_valid_loss"], ckpt["best_epoch"], ckpt["history"]

    def step(x_tilde, targets, noise, cache=True):
        return train_step(model, optimizer, x_tilde, targets, noise, tc.precision, cache)
    if graphed:
        step = GraphedStep(step)
    train, valid = splits["train"], splits["valid"]
    steps, static = cfg.steps, cfg.data.is_static
    n_batches = len(train) // tc.batch_size or 1
    # A resumed run's time budget and train_seconds go on from the epochs it already trained.
    t_start = time.monotonic() - sum(m["epoch_seconds"] for m in history)
    stop_reason = "max_epochs"
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.max_epochs + 1):
        t0 = time.monotonic()
        # Shuffling and noise depend only on (seed, epoch): a resumed run repeats them exactly.
        order = np.random.default_rng([tc.seed, epoch]).permutation(len(train))
        gen = torch.Generator(device).manual_seed(tc.seed * 1_000_003 + epoch)
        bar = progress_bar(n_batches, f"epoch {epoch}", progress)
        total = 0.0
        for b in range(n_batches):
            idx = np.sort(order[b * tc.batch_size:(b + 1) * tc.batch_size])
            frames, _ = train.batch(idx)
            inputs, targets = to_steps(torch.from_numpy(frames).to(device), steps, static)
            x_tilde = corrupt(inputs, cfg.noise, gen)                 # (T, B, 1, H, W)
            noise = gamma0_noise(inputs, cfg.model.k, gen)             # (B, K, 1, H, W)
            out = step(x_tilde, targets, noise)
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss}) at epoch {epoch}, batch {b + 1} of "
                                    f"{n_batches}: intra {out.intra.tolist()}, inter {out.inter.tolist()}")
            total += loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / (b + 1):.1f}")
        if bar is not None:
            bar.close()
        val = evaluate(model, valid, cfg, tc.valid_samples, seed=tc.seed)  # same noise every epoch
        improved = val["loss"] < best_loss
        if improved:
            best_loss, best_epoch = val["loss"], epoch
        metrics = {
            "epoch": epoch, "train_loss": total / n_batches, "valid_loss": val["loss"],
            "valid_ami": val["ami"], "valid_ami_mean": val["ami_mean"], "valid_ami_last": val["ami_last"],
            "best_valid_loss": best_loss, "best_epoch": best_epoch,
            "epoch_seconds": time.monotonic() - t0,
            "sequences_per_second": n_batches * tc.batch_size / (time.monotonic() - t0),
            "sequences_seen": epoch * n_batches * tc.batch_size,   # the budget, against the paper's
        }
        if tc.test_each_epoch:
            test = evaluate(model, splits["test"], cfg, tc.test_each_epoch, seed=tc.seed)
            metrics |= {"test_ami": test["ami"], "test_ami_mean": test["ami_mean"], "test_ami_last": test["ami_last"]}
        history.append(metrics)
        if ckpt_dir:
            state = dict(config=cfg.model_dump(mode="json"), model=model.state_dict(),
                         optimizer=optimizer.state_dict(), epoch=epoch, best_valid_loss=best_loss,
                         best_epoch=best_epoch, history=history)
            save_checkpoint(ckpt_dir / "last.pt", **state)
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", **state)
        if progress:
            print(f"epoch {epoch}: train {metrics['train_loss']:.2f}  valid {val['loss']:.2f}  "
                  f"valid AMI {val['ami']:.3f}{'  *' if improved else ''}", flush=True)
        if report is not None:
            report(metrics, ckpt_dir)
        if epoch - best_epoch >= tc.patience:
            stop_reason = "early_stopping"
            break
        if tc.time_budget_s and time.monotonic() - t_start > tc.time_budget_s:
            stop_reason = "time_budget"
            break

    summary = {"epochs": epoch, "best_epoch": best_epoch, "best_valid_loss": best_loss,
               "sequences_seen": epoch * n_batches * tc.batch_size, "stop_reason": stop_reason,
               "train_seconds": time.monotonic() - t_start,
               "precision": resolve_precision(tc.precision, device)}
    best = ckpt_dir / "best.pt" if ckpt_dir else None
    if best is not None and best.is_file():
        summary["checkpoint"] = str(best)
    if not test:
        return summary
    # Test with the best weights (the kept checkpoint), as the paper does.
    if best is not None and best.is_file():
        model.load_state_dict(load_checkpoint(best)["model"])
    result = evaluate(model, splits["test"], cfg, tc.test_samples, seed=tc.seed, panel=panel)
    return {"test_" + k: v for k, v in result.items()} | summary


# ----------------------------------------------------------------------------------------
# A curriculum: one fit per stage, each starting from the previous stage's best weights


def curriculum_stages(cfg: RunConfig) -> list[RunConfig]:
    """One run config per stage (``data.digit_pool`` = the stage's pool); ``[cfg]`` without one."""
    if not cfg.data.curriculum:
        return [cfg]
    raw = cfg.model_dump(mode="json")
    return [RunConfig.model_validate(raw | {"data": raw["data"] | {"curriculum": None, "digit_pool": pool}})
            for pool in cfg.data.curriculum]


def fit_curriculum(cfg: RunConfig, load: Callable[[Any, str], Split], report: Report | None = None,
                   resume: str | Path | None = None, progress: bool = False,
                   panel: str | Path | None = None) -> dict[str, Any]:
    """``fit`` stage after stage of ``data.curriculum`` (NEM_SPEC.md §4); one stage without one.

    ``load(data_config, split)`` returns a split. Each stage has its own early stopping and
    checkpoints in ``<checkpoint_dir>/stage<i>/``; a finished stage leaves ``stage.json``, so a
    resumed run (``resume`` = the checkpoint folder) skips it. Only the last stage is tested.
    Every report carries ``stage`` and ``iteration``, the epoch counted over all stages.
    """
    stages = curriculum_stages(cfg)
    final = stages[-1]
    root = Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else None
    if len(stages) > 1 and root is None:
        raise InputError("data.curriculum needs train.checkpoint_dir (stages start from the previous best.pt)")
    splits = {"valid": load(final.data, "valid"), "test": load(final.data, "test")}
    offset, init, done = 0, None, []
    for i, stage in enumerate(stages, start=1):
        stage_dir = root / f"stage{i}" if len(stages) > 1 else root
        if stage_dir is not None:
            stage.train.checkpoint_dir = str(stage_dir)
        marker = stage_dir / "stage.json" if len(stages) > 1 else None
        if marker is not None and marker.is_file():  # finished before a restart
            done.append(json.loads(marker.read_text()))
            offset, init = offset + done[-1]["epochs"], stage_dir / "best.pt"
            continue
        stage_resume = resume
        if len(stages) > 1 and resume is not None:  # the stage's own last.pt, if it got that far
            stage_resume = stage_dir / "last.pt" if (stage_dir / "last.pt").is_file() else None

        def stage_report(metrics: dict[str, Any], _dir: Path | None, i: int = i, offset: int = offset) -> None:
            if report is not None:
                per_epoch = metrics["sequences_seen"] // metrics["epoch"]
                report(metrics | {"stage": i, "iteration": offset + metrics["epoch"],
                                  "sequences_seen": (offset + metrics["epoch"]) * per_epoch}, root)

        if progress and len(stages) > 1:
            print(f"stage {i} of {len(stages)}: digit pool {stage.data.digit_pool}", flush=True)
        splits["train"] = load(stage.data, "train")
        result = fit(stage, splits, stage_report, stage_resume, progress, init=init, test=i == len(stages),
                     panel=panel)
        if marker is not None and i < len(stages):
            done.append({"stage": i, "digit_pool": stage.data.digit_pool} |
                        {k: result[k] for k in ("epochs", "best_epoch", "best_valid_loss", "stop_reason")})
            marker.write_text(json.dumps(done[-1]))
        offset, init = offset + result["epochs"], result.get("checkpoint")
    if len(stages) > 1:
        result |= {"epochs": offset, "stages": done,
                   "sequences_seen": offset * (result["sequences_seen"] // max(result["epochs"], 1))}
    return result


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
