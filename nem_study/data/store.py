"""The on-disk cache of generated data sets (Arrow IPC files, memory-mapped on read).

Layout: ``<data dir>/<name>-<hash12>/`` with ``train.arrow``, ``valid.arrow``, ``test.arrow`` and
``manifest.json``. The data dir is ``$NEM_DATA_DIR``, else ``platformdirs.user_cache_dir("nem-study")
/ "data"``. ``hash12`` = the first 12 hex digits of sha256(canonical JSON of ``spec.model_dump()``
with sorted keys + :data:`FORMAT_VERSION`), so every spec gets its own directory.

Each ``.arrow`` file (IPC *file* format, written by pyarrow's writer) has the columns ``image``
and ``label``, each a ``fixed_size_list<uint8>[T*H*W]`` with one row per sequence, in one record
batch per generated block of sequences (:data:`~nem_study.data.synth.BLOCK`): writing holds one
block in memory, and :func:`load` hands out each batch's columns as numpy views of the memory map
(zero copy, nothing loaded), which :meth:`Split.batch` indexes across.

Safety: a set is generated into a temporary sibling directory and renamed into place with
``os.rename`` (atomic), under an ``fcntl.flock`` lock per set, so two processes asking for the
same set generate it once and nobody sees a half-written set; a disk that fills up meanwhile is
one :class:`~nem_study.capacity.DiskFull` error, the temporary directory removed. :func:`load`
checks each file's sha256 against the manifest (once per process per file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from nem_study.capacity import DiskFull, cache_bytes, check_data_set, free_disk, is_disk_full
from nem_study.config import DataConfig, InputError
from nem_study.inputs import MAX_JSON_BYTES, human, read_text
from nem_study.data.mnist import load_mnist
from nem_study.data.paths import ENV_VAR, data_dir
from nem_study.data.synth import SPLITS, check, count, iter_blocks

#: bump when the file layout OR the generator's output changes: old caches are then ignored
FORMAT_VERSION = 3  # 2: Binding sprites and unit motion by default; 3: one record batch per block
MANIFEST = "manifest.json"
_VERIFIED: set[tuple] = set()  # files whose sha256 was checked in this process
builds = 0  # data sets this process generated (for tests and logs)


def spec_hash(spec: DataConfig) -> str:
    canon = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{canon}|format={FORMAT_VERSION}".encode()).hexdigest()[:12]


def set_dir(spec: DataConfig) -> Path:
    """Where the data set of ``spec`` lives (whether or not it exists yet)."""
    return data_dir() / f"{spec.name}-{spec_hash(spec)}"


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("nem-study")
    except Exception:
        import nem_study

        return getattr(nem_study, "__version__", "unknown")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _fix(d: Path) -> str:
    return (f"Delete {d} to have it generated again (or run `nem-study data generate --force` "
            "with the same data spec).")


# ----------------------------------------------------------------------------------------
# Writing


def _schema(spec: DataConfig) -> pa.Schema:
    row = spec.frames * spec.image_size * spec.image_size
    meta = {"nem_study.shape": json.dumps([spec.frames, spec.image_size, spec.image_size]),
            "nem_study.format_version": str(FORMAT_VERSION)}
    return pa.schema([("image", pa.list_(pa.uint8(), row)), ("label", pa.list_(pa.uint8(), row))],
                     metadata=meta)


def _column(a: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(a).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), values.size // len(a))  # zero copy


def _write_split(spec: DataConfig, split: str, mnist, path: Path, progress: bool) -> None:
    """Write one split, one record batch per generated block (so one block in memory at a time)."""
    from tqdm import tqdm

    n, schema = count(spec, split), _schema(spec)
    # the bar is closed on an error too, so that the error message starts a line of its own
    with (tqdm(total=n, desc=f"{spec.name} {split}", unit="seq", file=sys.stderr, disable=not progress) as bar,
          pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer):
        for im, lab in iter_blocks(spec, split, n, mnist):
            writer.write_batch(pa.record_batch([_column(im), _column(lab)], schema=schema))
            bar.update(len(im))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # on disk before the manifest names it and the rename publishes it
    finally:
        os.close(fd)


def _build(spec: DataConfig, out: Path, mnist, progress: bool) -> None:
    global builds
    t0 = time.time()
    splits = {}
    for split in SPLITS:
        ts = time.time()
        path = out / f"{split}.arrow"
        _write_split(spec, split, mnist, path, progress)
        splits[split] = {"file": path.name, "count": count(spec, split), "bytes": path.stat().st_size,
                         "sha256": _sha256(path), "generation_seconds": round(time.time() - ts, 3)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "hash": spec_hash(spec),
        "spec": spec.model_dump(mode="json"),
        "shape": [spec.frames, spec.image_size, spec.image_size],
        "dtype": "uint8",
        "scale": 1.0 / 255.0 if spec.grey else 1.0,
        "labels": {"background": 0, "objects": f"1..{spec.objects}", "overlap": 255},
        "columns": ["image", "label"],
        "splits": splits,
        "mnist": None if mnist is None else {"source": mnist.source, "sha256": mnist.fingerprint()},
        "package_version": _package_version(),
        "numpy_version": np.__version__,
        "pyarrow_version": pa.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation_seconds": round(time.time() - t0, 3),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    builds += 1


@contextmanager
def _lock(path: Path, progress: bool) -> Iterator[None]:
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process to finish {path.name[1:-5]} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_space(spec: DataConfig) -> None:
    """Refuse up front (one InputError) a data set that is not cached and would not fit the
    cache's disk or memory; :func:`ensure` checks the same before it writes anything."""
    if not set_dir(spec).is_dir():
        check_data_set(spec, data_dir())


def ensure(spec: DataConfig, mnist_path: str | os.PathLike | None = None, progress: bool = True,
           force: bool = False) -> Path:
    """Generate the data set of ``spec`` into the cache unless it is there; return its directory.

    ``force``: generate it again even if it exists (replaces it atomically). ``mnist_path``: where
    MNIST is (flying_mnist only; see :func:`mnist.load_mnist`). Progress goes to stderr.
    """
    for split in SPLITS:
        check(spec, split)
    final = set_dir(spec)
    if final.is_dir() and not force:
        return final
    root = final.parent
    check_data_set(spec, root)  # before the folder, the lock or MNIST: nothing written if it cannot fit
    mnist = load_mnist(mnist_path) if spec.name == "flying_mnist" else None  # a bad --mnist: nothing written
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the data directory {root} ({e}); set {ENV_VAR} to a "
                         "writable directory") from None
    with _lock(root / f".{final.name}.lock", progress):
        if final.is_dir() and not force:
            return final  # another process made it while we waited
        for prefix in (".tmp", ".trash"):  # left by a crashed run (we hold the lock)
            for old in root.glob(f"{prefix}-{final.name}-*"):
                shutil.rmtree(old, ignore_errors=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        t0 = time.time()
        if progress:
            print(f"generating {spec.name} -> {final}", file=sys.stderr)
        try:
            tmp.mkdir()
            _build(spec, tmp, mnist, progress)
            if final.exists():
                trash = root / f".trash-{final.name}-{os.getpid()}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise DiskFull(f"{root}: disk full ({os.strerror(e.errno)}) while writing the {spec.name} data set: "
                               f"its files need more than {human(cache_bytes(spec))}, {human(free_disk(root)[0])} is "
                               f"free there now. Nothing was kept; free some space there, or set {ENV_VAR} to a "
                               "folder on a larger disk, and run again") from None
            raise
        if progress:
            print(f"generated {spec.name} in {time.time() - t0:.1f} s", file=sys.stderr)
    return final


# ----------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set: its sequences in chunks of uint8 (n, T, H, W) arrays, one per
    record batch (read-only views of the memory-mapped file); an array given is one chunk."""

    images: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    scale: float
    spec: DataConfig
    split: str = "train"
    path: Path | None = None
    _keep: Any = field(default=None, repr=False)  # the Arrow table that owns the mapping

    def __post_init__(self) -> None:
        for name in ("images", "labels"):
            chunks = getattr(self, name)
            object.__setattr__(self, name, (chunks,) if isinstance(chunks, np.ndarray) else tuple(chunks))

    @cached_property
    def _starts(self) -> np.ndarray:
        return np.cumsum([0] + [len(c) for c in self.images])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """float32 images scaled to [0, 1] and uint8 labels of the given sequences (1-D indices)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sequence index out of range 0..{len(self) - 1}")
        chunk = np.searchsorted(self._starts, idx, side="right") - 1
        row = idx - self._starts[chunk]
        shape = (len(idx), self.spec.frames, self.spec.image_size, self.spec.image_size)
        images, labels = np.empty(shape, np.float32), np.empty(shape, np.uint8)
        for j, (c, r) in enumerate(zip(chunk.tolist(), row.tolist())):
            # row by row straight into float32 (measured: as fast as one array's [idx].astype)
            images[j], labels[j] = self.images[c][r], self.labels[c][r]
        if self.scale != 1.0:
            images *= np.float32(self.scale)
        return images, labels


def read_manifest(d: Path) -> dict:
    path = d / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: missing, so the data set in {d} is incomplete. {_fix(d)}")
    try:
        manifest = json.loads(read_text(path, "data set manifest", MAX_JSON_BYTES))
    except InputError as e:
        raise InputError(f"{e}. {_fix(d)}") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: cannot be read (not JSON: {str(e)[:200]}). {_fix(d)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise InputError(f"{path}: not a data set manifest. {_fix(d)}")
    return manifest


def _verify(path: Path, expected: str, d: Path) -> None:
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    if _sha256(path) != expected:
        raise InputError(f"{path}: sha256 does not match {d / MANIFEST} (the file is damaged or was "
                         f"changed). {_fix(d)}")
    _VERIFIED.add(key)


def _to_numpy(table: pa.Table, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    chunks = tuple(c.flatten().to_numpy(zero_copy_only=True).reshape((-1, *shape[1:]))
                   for c in table.column(name).chunks)
    if (rows := sum(len(c) for c in chunks)) != shape[0]:
        raise ValueError(f"column {name} has {rows} rows, expected {shape[0]}")
    return chunks


def load(spec: DataConfig, split: str, mnist_path: str | os.PathLike | None = None, verify: bool = True,
         progress: bool = True) -> Split:
    """Ensure the data set exists, then memory-map one split (``train``, ``valid`` or ``test``)."""
    check(spec, split)
    d = ensure(spec, mnist_path, progress=progress)
    manifest = read_manifest(d)
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("spec") != spec.model_dump(mode="json"):
        raise InputError(f"{d / MANIFEST}: written for another data spec or format version than the "
                         f"one asked for. {_fix(d)}")
    entry = manifest["splits"].get(split)
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
        raise InputError(f"{d / MANIFEST}: no entry for the {split} split. {_fix(d)}")
    if not isinstance(entry["file"], str) or "/" in entry["file"] or entry.get("count") != count(spec, split):
        raise InputError(f"{d / MANIFEST}: the {split} entry does not match the data spec (file "
                         f"{entry['file']!r}, count {entry.get('count')!r}, expected {count(spec, split)}). {_fix(d)}")
    path = d / entry["file"]
    if not path.is_file():
        raise InputError(f"{path}: missing. {_fix(d)}")
    if verify:
        _verify(path, entry["sha256"], d)
    shape = (int(entry["count"]), spec.frames, spec.image_size, spec.image_size)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        images, labels = _to_numpy(table, "image", shape), _to_numpy(table, "label", shape)
    except (pa.ArrowException, ValueError, KeyError) as e:
        raise InputError(f"{path}: not a readable data file ({e}). {_fix(d)}") from None
    scale = 1.0 / 255.0 if spec.grey else 1.0
    return Split(images, labels, scale, spec, split, path, table)
