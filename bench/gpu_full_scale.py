"""Helper of bench/gpu_full_scale.sh: device facts, a resumed run's counters, the summary.

    python bench/gpu_full_scale.py env FILE            # device, torch, GPU name -> FILE (JSON)
    python bench/gpu_full_scale.py prior CKPT          # "EPOCH SECONDS" a checkpoint trained
    python bench/gpu_full_scale.py collect WORK OUT RUN...   # OUT/metrics.json, OUT/summary.json

Every name written to the JSON files is relative (run names, checkpoint members, the
resumed-from folder's base name): no machine path.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from pathlib import Path


def cmd_env(path: str) -> int:
    import torch

    cuda = torch.cuda.is_available()
    info = {
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    Path(path).write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


def cmd_prior(ckpt: str) -> int:
    """The last epoch of a checkpoint and the seconds its epochs took (the trainer's time
    budget counts them: a resumed run must get a budget of these plus the new seconds)."""
    from nem_study.checkpoints import load_checkpoint

    c = load_checkpoint(ckpt)
    print(c["epoch"], round(sum(m["epoch_seconds"] for m in c["history"]), 3))
    return 0


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_summary(work: Path, name: str, device: str | None) -> tuple[dict, dict]:
    """(the run's line in summary.json, its metrics for metrics.json)."""
    from nem_study.checkpoints import load_checkpoint

    d = work / name
    part = _read_json(d / "part.json") or {}       # rc, wall_s, time_budget_s, from the shell
    prior = _read_json(d / "prior.json") or {"epoch": 0, "seconds": 0.0}
    line = {"run": name, **part, "resumed_from_epoch": prior["epoch"]}
    if not (d / "last.pt").is_file():
        line["status"] = "no checkpoint"
        return line, {}
    ckpt = load_checkpoint(d / "last.pt")
    cfg = ckpt["config"]
    bs = cfg.train.batch_size
    per_epoch = (cfg.data.train // bs or 1) * bs       # the trainer's n_batches * batch_size
    metrics = _read_json(d / "metrics.json")
    if metrics is None:  # killed before the CLI wrote it: the checkpoint's history is all there is
        metrics = {"epochs": ckpt["epoch"], "best_epoch": ckpt["best_epoch"],
                   "best_valid_loss": ckpt["best_valid_loss"], "stop_reason": "killed (timeout) or failed",
                   "history": ckpt["history"]}
    metrics.pop("checkpoint", None)                     # a path on the machine that trained
    history = metrics.get("history", [])
    for m in history:
        m["sequences_seen"] = m["epoch"] * per_epoch
    new = [m for m in history if m["epoch"] > prior["epoch"]]
    seconds = sum(m["epoch_seconds"] for m in new)
    last = history[-1] if history else {}
    line |= {
        "status": "ok" if part.get("rc") == 0 else f"exit code {part.get('rc')}",
        "data": cfg.data.name, "objects": cfg.data.objects, "train_sequences": cfg.data.train,
        "model": cfg.model.kind, "k": cfg.model.k, "steps": cfg.steps, "batch_size": bs,
        "precision": metrics.get("precision", cfg.train.precision), "cuda_graph": cfg.train.cuda_graph and device == "cuda",
        "epochs": ckpt["epoch"], "epochs_this_run": len(new),
        "sequences_seen": ckpt["epoch"] * per_epoch, "sequences_seen_this_run": len(new) * per_epoch,
        # training + the per-epoch validation (the trainer's epoch_seconds), this run's epochs
        "sequences_per_second": len(new) * per_epoch / seconds if seconds else None,
        "sequences_per_second_last_epoch": last.get("sequences_per_second"),
        "train_seconds_this_run": round(seconds, 2),
        "stop_reason": metrics.get("stop_reason"), "best_epoch": ckpt["best_epoch"],
        "valid_ami_last_epoch": last.get("valid_ami"),
        "test_ami_each_epoch_last": last.get("test_ami"),
        # the final test (all test_samples, best weights of this run; see the script's header)
        "test_ami": metrics.get("test_ami"), "test_ami_last": metrics.get("test_ami_last"),
        "test_ami_score": metrics.get("test_ami_score"), "test_n": metrics.get("test_n"),
        "checkpoint": f"{name}/last.pt", "checkpoint_bytes": (d / "last.pt").stat().st_size,
    }
    return line, metrics


def cmd_collect(work: str, out: str, runs: list[str]) -> int:
    w, o = Path(work), Path(out)
    head = _read_json(w / "run.json") or {}
    env = _read_json(w / "env.json") or {}
    lines, metrics = [], {}
    for name in runs:
        line, m = run_summary(w, name, env.get("device"))
        lines.append(line)
        if m:
            metrics[name] = m
    parts = sorted(p.name for p in o.glob("checkpoints.tar.[0-9][0-9]"))
    tar = w / "checkpoints.tar"
    summary = {
        **head, **{k: env.get(k) for k in ("device", "gpu", "cpu", "torch", "cuda", "python")},
        "elapsed_s": round(time.time() - head.get("started", time.time()), 1),
        "checkpoints": {"parts": parts, "join": "cat checkpoints.tar.?? > checkpoints.tar",
                        "bytes": tar.stat().st_size if tar.is_file() else None,
                        "sha256": _sha256(tar) if tar.is_file() else None},
        "runs": lines,
    }
    summary.pop("started", None)
    (o / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (o / "summary.json").write_text(json.dumps(summary, indent=1))
    for r in lines:
        print(f"  {r['run']}: {r.get('status')}, epochs {r.get('epochs')} ({r.get('epochs_this_run')} this run), "
              f"sequences seen {r.get('sequences_seen')}, "
              f"{_fmt(r.get('sequences_per_second'))} sequences/s, test AMI {_fmt(r.get('test_ami'), 3)}, "
              f"wall {r.get('wall_s')} s")
    return 0


def _fmt(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"] and len(argv) == 2:
        return cmd_env(argv[1])
    if argv[:1] == ["prior"] and len(argv) == 2:
        return cmd_prior(argv[1])
    if argv[:1] == ["collect"] and len(argv) >= 4:
        return cmd_collect(argv[1], argv[2], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
