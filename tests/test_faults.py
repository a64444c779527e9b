"""Faults from outside: a process killed while it writes, a disk that fills up while it writes.

Each test makes the fault happen for real (SIGKILL to a writing process, ENOSPC from a small
tmpfs) and checks what is left: the last complete checkpoint or data set, or nothing, never a
half-written one that gets loaded, and one clear error.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nem_study import data
from nem_study.capacity import DiskFull, cache_bytes
from nem_study.checkpoints import load_checkpoint, save_checkpoint
from nem_study.config import DataConfig, RunConfig
from nem_study.data import store

ENV = os.environ | {"OMP_NUM_THREADS": "1"}
BIG = 8 << 20  # floats in the checkpoint the killed writer saves: 32 MB, so a write takes a while


def state(step: int, n: int) -> dict:
    """A checkpoint's content whose weights, ``n`` of them, all equal ``step``."""
    return dict(config=RunConfig().model_dump(mode="json"), model={"w": torch.full((n,), float(step))}, step=step)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def kill_when(proc: subprocess.Popen, ready, timeout: float = 30.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the writer ended (code {proc.returncode}) before it could be killed: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer never reached the point where it is killed")
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_checkpoint_survives_kill_mid_write(tmp_path):
    """A run killed while it writes a checkpoint leaves the previous one whole: resuming loads a
    complete checkpoint, never the half-written file, and the next save replaces that file."""
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    last, saved = ckpt_dir / "last.pt", tmp_path / "saved"
    writer = ("import sys\n"
              "from pathlib import Path\n"
              f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_faults import BIG, state\n"
              "from nem_study.checkpoints import save_checkpoint\n"
              "path = Path(sys.argv[1])\n"
              "save_checkpoint(path, **state(0, 10))\n"
              "Path(sys.argv[2]).touch()\n"
              "for step in range(1, 1000):\n"
              "    save_checkpoint(path, **state(step, BIG))\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(last), str(saved)], env=ENV, stderr=subprocess.PIPE)
    # mid-write: after the first (small) save, some file there holds part of a large checkpoint
    kill_when(proc, lambda: saved.exists() and any(1 << 20 < _size(p) < 4 * BIG for p in ckpt_dir.iterdir()))

    ckpt = load_checkpoint(ckpt_dir)  # as `nem-study resume` does
    w = ckpt["model"]["w"]
    assert w.numel() == (10 if ckpt["step"] == 0 else BIG) and bool((w == ckpt["step"]).all())

    save_checkpoint(last, **state(-1, 3))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt"]
    assert load_checkpoint(ckpt_dir)["step"] == -1


def test_data_cache_survives_kill_mid_generation(tmp_path, monkeypatch):
    """Generation killed half-way leaves no data set in the cache, only its temporary folder; the
    next use generates the set again, removes that folder, and gets the very bytes a fresh
    generation in an empty cache writes."""
    spec = DataConfig(name="static_shapes", train=40_000, valid=100, test=100)
    cache = tmp_path / "cache"
    monkeypatch.setenv(store.ENV_VAR, str(cache))
    generate = ("import sys\n"
                "from nem_study.config import DataConfig\n"
                "from nem_study.data import store\n"
                "store.ensure(DataConfig.model_validate_json(sys.argv[1]), progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", generate, spec.model_dump_json()],
                            env=ENV | {store.ENV_VAR: str(cache)}, stderr=subprocess.PIPE)
    kill_when(proc, lambda: any(_size(p) > 0 for p in cache.glob("*/train.arrow")))  # the first file begun

    assert not store.set_dir(spec).exists()
    assert list(cache.glob(".tmp-*")), "the kill was meant to land while the set was being written"
    builds = store.builds
    splits = {s: store.load(spec, s, progress=False) for s in data.SPLITS}
    assert store.builds == builds + 1
    assert not list(cache.glob(".tmp-*"))

    manifest = store.read_manifest(store.set_dir(spec))
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "fresh"))
    fresh = store.read_manifest(store.ensure(spec, progress=False))
    for s in data.SPLITS:
        assert manifest["splits"][s]["sha256"] == fresh["splits"][s]["sha256"]
        again = store.load(spec, s, progress=False)
        for a, b in zip(splits[s].images + splits[s].labels, again.images + again.labels):
            assert np.array_equal(a, b)


# ----------------------------------------------------------------------------------------
# A full disk: a 1 MiB tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted in ``tmp_path``, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        # lazy: a memory map this process still holds must not make the unmount fail
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def leave_free(disk: Path, free: int) -> Path:
    """Fill ``disk`` with a filler file until exactly ``free`` bytes (whole pages) are left."""
    filler = disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(disk).free - free))
    assert shutil.disk_usage(disk).free == free
    return filler


#: a set of 627 kB whose files take a few kB more (Arrow headers, the manifest)
SMALL = DataConfig(name="static_shapes", train=300, valid=50, test=50)


def nearly_full(disk: Path) -> Path:
    """Leave the space check before generating :data:`SMALL` just satisfied (its bytes, rounded up
    to a page), so that writing its files fills the disk for real."""
    page = os.statvfs(disk).f_frsize
    return leave_free(disk, math.ceil(cache_bytes(SMALL) / page) * page)


def test_data_disk_full(small_disk, monkeypatch):
    """The disk filling up while a data set is written is one DiskFull error naming the cache
    folder and what the set needs; nothing is left behind, and once space is freed it works."""
    cache = small_disk / "cache"
    monkeypatch.setenv(store.ENV_VAR, str(cache))
    filler = nearly_full(small_disk)

    with pytest.raises(DiskFull, match=f"^{cache}: disk full .* need more than 627 kB"):
        store.ensure(SMALL, progress=False)
    assert not store.set_dir(SMALL).exists()
    assert not list(cache.glob(".tmp-*"))

    filler.unlink()
    split = store.load(SMALL, "train", progress=False)
    images, labels = data.generate(SMALL, "train")
    assert np.array_equal(np.concatenate(split.images), images) and np.array_equal(np.concatenate(split.labels), labels)


def test_cli_data_disk_full(small_disk, tmp_path):
    """`nem-study data generate` on a disk that fills up: exit code 2 and one error line naming
    the cache folder, no traceback."""
    cache = small_disk / "cache"
    nearly_full(small_disk)
    sizes = [f"--set={s}={getattr(SMALL, s)}" for s in data.SPLITS]
    run = subprocess.run([Path(sys.executable).with_name("nem-study"), "data", "generate", "static_shapes", *sizes],
                         env=ENV | {store.ENV_VAR: str(cache), "NEM_STUDY_LOG_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"nem-study: error: {cache}: disk full"), run.stderr
    assert not [p for p in cache.iterdir() if p.is_dir()]  # neither the set nor its temporary folder


def test_checkpoint_disk_full(small_disk):
    """Saving a checkpoint on a full disk is one DiskFull error naming the file; the previous
    checkpoint still loads, no temporary file is left, and once space is freed saving works."""
    last = small_disk / "last.pt"
    save_checkpoint(last, **state(0, 10))
    filler = leave_free(small_disk, 0)

    with pytest.raises(DiskFull, match=f"^{last}: disk full .* the previous one is kept"):
        save_checkpoint(last, **state(1, 1000))
    assert load_checkpoint(last)["step"] == 0
    assert not last.with_suffix(".tmp").exists()

    filler.unlink()
    save_checkpoint(last, **state(1, 1000))
    assert load_checkpoint(last)["step"] == 1
