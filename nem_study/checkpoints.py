"""Checkpoints: plain dicts of tensors and JSON values, loadable with ``weights_only=True``.

Written whole or not at all; read through the guarded checks of ``nem_study.inputs``, every
problem one InputError naming the file. A checkpoint stores its resolved run config.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nem_study.capacity import DiskFull, is_disk_full
from nem_study.config import InputError, RunConfig
from nem_study.inputs import human
from nem_study.model import NEM
from nem_study.step import pick_device

CHECKPOINT_FORMAT = "nem-study-checkpoint/1"


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
