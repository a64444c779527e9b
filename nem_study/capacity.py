"""Does the work fit? Disk and memory sizes checked before anything is generated or allocated.

One job: from a data spec or a run config, compute what a step would need (the cache's files,
a split in memory, a training batch) and refuse with one
:class:`~nem_study.inputs.InputError` naming the config field, what it would need and what there
is, e.g. ``data.train = 1000000000000: the cache would need 32.9 PB on /root/.cache/..., 53.2 GB
free``. The callers: :func:`nem_study.data.store.ensure` (the cache), :func:`nem_study.data.synth.
generate` (arrays in memory), ``nem-study train`` and ``nem-study evaluate`` (the batch).

The estimates are lower bounds (the bytes of the arrays themselves), so a refusal is certain,
not a guess; what passes may still need more (Python, torch, the network's activations).
"""

from __future__ import annotations

import errno
import os

from nem_study.config import SPLITS
from nem_study.inputs import InputError, human
from nem_study.machine import available_memory, free_disk


class DiskFull(InputError):
    """The disk filled up (or the quota ran out) while writing, although the check before passed:
    the space went to something else meanwhile, or the estimate (a lower bound) was just short.
    The writer keeps nothing half-written; the message names the file or folder."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _row(spec) -> int:
    return spec.frames * spec.image_size * spec.image_size


def _largest(spec) -> str:
    return max(SPLITS, key=lambda s: getattr(spec, s))


def _field(spec) -> str:
    split = _largest(spec)
    return f"data.{split} = {getattr(spec, split)}"


def cache_bytes(spec) -> int:
    """What the data set of ``spec`` takes in the cache, at least: images and labels of every
    split, one byte per pixel."""
    return 2 * sum(getattr(spec, s) for s in SPLITS) * _row(spec)


def check_data_set(spec, folder: str | os.PathLike) -> None:
    """Before the cache writes the data set of ``spec`` into ``folder``: its three files (images
    and labels, uint8) must fit the free disk (the writer holds one block of sequences in memory)."""
    total = sum(getattr(spec, s) for s in SPLITS)
    need = cache_bytes(spec)
    free, _ = free_disk(folder)
    if need > free:
        raise InputError(f"{_field(spec)}: the cache would need {human(need)} ({total:,} sequences of "
                         f"{spec.frames} x {spec.image_size} x {spec.image_size} px, images and labels) on "
                         f"{folder}, {human(free)} free")


def check_data_sets(specs, folder: str | os.PathLike) -> None:
    """Before a study generates the data sets it lacks (``specs``): each as
    :func:`check_data_set`, and all of them together on the free disk."""
    for spec in specs:
        check_data_set(spec, folder)
    need = sum(cache_bytes(spec) for spec in specs)
    free, _ = free_disk(folder)
    if need > free:
        raise InputError(f"the study's {len(specs)} data sets not yet cached would need {human(need)} together "
                         f"(images and labels) on {folder}, {human(free)} free; each alone would fit")


def check_in_memory(spec, split: str, n: int) -> None:
    """Before :func:`nem_study.data.synth.generate` allocates ``n`` sequences of ``split``
    (images and labels, uint8) in memory."""
    need = 2 * n * _row(spec)
    free = available_memory()
    if free is not None and need > free:
        raise InputError(f"data.{split} = {n}: generating it in memory needs {human(need)}, "
                         f"{human(free)} of memory free")


def check_batch(cfg, k: int | None = None, steps: int | None = None, source: str | None = None) -> None:
    """Before training or evaluating: one batch must fit in memory (the GPU's, when
    ``train.device`` resolves to CUDA). The estimate is what any step holds at least: the float32
    frames of the batch and, per step, K components' predictions, soft assignments and network
    inputs, (steps + 1) x B x (1 + 3 K) x pixels x 4 bytes; the network's activations come on top.
    B is train.batch_size, at most data.train. ``source`` names what was set (default the batch size)."""
    k = k or cfg.model.k
    steps = steps or cfg.steps
    batch = min(cfg.train.batch_size, cfg.data.train)
    pixels = cfg.data.image_size * cfg.data.image_size
    need = (steps + 1) * batch * (1 + 3 * k) * pixels * 4
    free, where = available_memory(), "of memory free"
    if cfg.train.device != "cpu":
        import torch

        if torch.cuda.is_available():
            free, where = torch.cuda.mem_get_info()[0], "free on the GPU"
    if free is not None and need > free:
        raise InputError(f"{source or f'train.batch_size = {cfg.train.batch_size}'}: one batch of {batch:,} "
                         f"sequences x {steps + 1} steps x K = {k} needs at least {human(need)}, "
                         f"{human(free)} {where}")
