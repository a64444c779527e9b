"""MNIST sources, digit down-sampling and the curriculum pools (NEM_SPEC.md §4).

Sources, tried in this order (:func:`load_mnist`):

1. a path the user gives (``--mnist PATH`` / ``mnist_path``, else the ``NEM_MNIST`` environment
   variable): an ``.npz`` with ``x_train`` (50000, 28, 28), ``x_valid``, ``x_test`` uint8 (the
   classic split), or a directory with the IDX files ``train-images-idx3-ubyte[.gz]`` and
   ``t10k-images-idx3-ubyte[.gz]`` (the 60,000 training images are split into the first 50,000
   for train and the last 10,000 for valid), or a directory holding ``mnist.npz``. A path that
   was given but does not work is an error at once (no silent fallback).
2. a copy downloaded earlier into the cache (``<data dir>/mnist/``, see :mod:`store`);
3. a download of the two IDX image files from :data:`MIRRORS` into that cache;
4. torchvision's MNIST, if torchvision is importable (downloads into the cache too).

If nothing works, one :class:`InputError` lists every attempt and how to fix it.

Down-sampling: the whole 28x28 MNIST frame (not the ink's bounding box) is resampled to
``digit_size`` x ``digit_size`` by exact area averaging (for 14 px: the mean of each 2x2 block),
rounded half up to uint8. Keeping the frame keeps MNIST's own centring and margin (a 14 px digit
has its ink in about the central 10x10). The arithmetic is done on integer-valued float64, so it
is exact and identical on every machine.

Curriculum: the train split draws its digits from the first ``spec.digit_pool`` training digits
(``None`` = all 50,000); valid and test draw from all valid / test digits.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nem_study.config import DataConfig, InputError
from nem_study.data.paths import data_dir
from nem_study.inputs import check_archive, check_file, human

ENV_VAR = "NEM_MNIST"
#: IDX image files and where to get them (tried in order; a test may replace this list)
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
DOWNLOAD_TIMEOUT_S = 10.0
N_TRAIN = 50_000
#: the most pixels an MNIST source may unpack to (70,000 x 28 x 28 = 55 MB; a bigger file is not MNIST)
MAX_MNIST_BYTES = 1_000_000_000
FIX = f"Pass --mnist PATH (or set {ENV_VAR}=PATH) with an MNIST .npz (x_train, x_valid, x_test) " \
      "or a directory with the IDX files train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz."


@dataclass
class Mnist:
    """MNIST images in the classic split, uint8 (N, 28, 28)."""

    x_train: np.ndarray
    x_valid: np.ndarray
    x_test: np.ndarray
    source: str
    _pools: dict = field(default_factory=dict, repr=False, compare=False)

    def images(self, split: str) -> np.ndarray:
        return {"train": self.x_train, "valid": self.x_valid, "test": self.x_test}[split]

    def fingerprint(self) -> dict[str, str]:
        """sha256 of each split's pixels (recorded in the data set manifest)."""
        return {s: hashlib.sha256(np.ascontiguousarray(self.images(s)).data).hexdigest()
                for s in ("train", "valid", "test")}

    def pool(self, spec: DataConfig, split: str) -> np.ndarray:
        """The down-sampled digits a split draws from: (P, S, S) uint8 (curriculum for train)."""
        x = self.images(split)
        if split == "train" and spec.digit_pool is not None:
            if spec.digit_pool > len(x):
                raise InputError(f"data.digit_pool = {spec.digit_pool} exceeds the {len(x)} MNIST "
                                 f"training digits; use at most {len(x)} (or leave it empty for all)")
            x = x[: spec.digit_pool]
        key = (split, len(x), spec.digit_size)
        if key not in self._pools:
            self._pools[key] = downsample(x, spec.digit_size)
        return self._pools[key]


def _area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) overlap lengths of target cell i and source pixel p, on a grid where the image
    is src * dst units wide: cell i covers [i*src, (i+1)*src), pixel p covers [p*dst, (p+1)*dst).
    All integers; every row sums to src."""
    i = np.arange(dst)[:, None]
    p = np.arange(src)[None, :]
    lo = np.maximum(i * src, p * dst)
    hi = np.minimum((i + 1) * src, (p + 1) * dst)
    return np.maximum(hi - lo, 0).astype(np.float64)


def downsample(x: np.ndarray, size: int, chunk: int = 10_000) -> np.ndarray:
    """Area-average (N, h, w) uint8 images to (N, size, size) uint8, rounding half up."""
    n, h, w = x.shape
    wr, wc = _area_weights(h, size), _area_weights(w, size)
    den = float(h * w)  # each output cell's weights sum to h*w (in these integer units)
    out = np.empty((n, size, size), np.uint8)
    for a in range(0, n, chunk):
        blk = x[a:a + chunk].astype(np.float64)
        num = wr @ blk @ wc.T  # integer-valued, < 2**53: exact in any summation order
        out[a:a + chunk] = np.floor((num + den / 2) / den).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------
# Readers


def _read_idx(path: Path) -> np.ndarray:
    """An IDX image file (gzip or not, by its magic bytes, not the name: a download's .part file
    has no .gz), read no further than its header says, so a huge or endless file costs nothing."""
    size = check_file(path, "MNIST IDX file")
    if size == 0:
        raise InputError(f"{path}: empty (0 bytes); expected an MNIST IDX image file. {FIX}")
    try:
        with open(path, "rb") as f:
            opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            header = f.read(16)
            if len(header) < 16 or int.from_bytes(header[:4], "big") != 2051:
                raise InputError(f"{path}: not an MNIST IDX image file (bad magic number). {FIX}")
            n, rows, cols = (int.from_bytes(header[i:i + 4], "big") for i in (4, 8, 12))
            expected = n * rows * cols
            if expected > MAX_MNIST_BYTES:
                raise InputError(f"{path}: its header declares {n:,} images of {rows}x{cols} "
                                 f"({human(expected)}), far more than MNIST; not an MNIST file. {FIX}")
            raw = f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read this IDX file ({type(e).__name__}: {e}). {FIX}") from None
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing data after the images in"
        raise InputError(f"{path}: {what} IDX file ({16 + len(raw)}{'+' if len(raw) > expected else ''} "
                         f"bytes, expected {16 + expected}); delete it and fetch it again")
    return np.frombuffer(raw, np.uint8).reshape(n, rows, cols)


def _find_idx(folder: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some copies are named train-images.idx3-ubyte
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def _from_idx_dir(folder: Path) -> Mnist:
    found = {k: _find_idx(folder, stem) for k, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] + "[.gz]" for k, p in found.items() if p is None]
    if missing:
        raise InputError(f"{folder}: no MNIST here (missing {', '.join(missing)}). {FIX}")
    train, test = _read_idx(found["train"]), _read_idx(found["test"])
    if train.shape != (60_000, 28, 28) or test.shape != (10_000, 28, 28):
        raise InputError(f"{folder}: expected 60,000 + 10,000 images of 28x28, got "
                         f"{train.shape} and {test.shape}")
    return Mnist(train[:N_TRAIN], train[N_TRAIN:], test, source=str(folder))


def _from_npz(path: Path) -> Mnist:
    check_archive(path, "MNIST .npz", MAX_MNIST_BYTES, hint=FIX)  # before numpy unpacks anything
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "x_valid", "x_test") if k in z.files}
            files = list(z.files)
    except Exception as e:  # zipfile / numpy raise several kinds
        raise InputError(f"{path}: cannot read this .npz ({type(e).__name__}: {e}). {FIX}") from None
    missing = [k for k in ("x_train", "x_valid", "x_test") if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing array(s) {', '.join(missing)} (found {', '.join(files)}); "
                         f"expected x_train, x_valid, x_test as uint8 (N, 28, 28)")
    for k, a in arrays.items():
        if a.ndim == 2 and a.shape[1] == 784:
            a = arrays[k] = a.reshape(-1, 28, 28)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[1:] != (28, 28):
            raise InputError(f"{path}: {k} must be uint8 (N, 28, 28) with values 0..255, "
                             f"got {a.dtype} {a.shape}")
    return Mnist(arrays["x_train"], arrays["x_valid"], arrays["x_test"], source=str(path))


def from_path(path: str | os.PathLike, origin: str = "--mnist") -> Mnist:
    """Read MNIST from a user-given .npz file or IDX directory; errors name the path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p} (from {origin}): no such file or directory. {FIX}")
    if p.is_dir():
        if (p / "mnist.npz").is_file() and _find_idx(p, IDX_FILES["train"]) is None:
            return _from_npz(p / "mnist.npz")
        return _from_idx_dir(p)
    if p.suffix == ".npz":
        return _from_npz(p)
    raise InputError(f"{p} (from {origin}): expected an .npz file or a directory with IDX files. {FIX}")


# ----------------------------------------------------------------------------------------
# Cache, download, torchvision


def _download(cache: Path) -> None:
    """Fetch the two IDX image files into ``cache`` (atomic per file); raise OSError on failure."""
    cache.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES.values():
        target = cache / f"{stem}.gz"
        if target.is_file():
            continue
        errors = []
        for mirror in MIRRORS:
            url = mirror + target.name
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
                _read_idx(tmp)  # validates (magic, size)
                os.replace(tmp, target)
                break
            except (OSError, InputError, ValueError) as e:
                errors.append(f"{url}: {e}")
                tmp.unlink(missing_ok=True)
        else:
            raise OSError("; ".join(errors))


def _from_torchvision(cache: Path) -> Mnist:
    import torchvision  # noqa: F401  (optional)
    from torchvision.datasets import MNIST

    root = cache / "torchvision"
    train = MNIST(str(root), train=True, download=True).data.numpy()
    test = MNIST(str(root), train=False, download=True).data.numpy()
    return Mnist(train[:N_TRAIN], train[N_TRAIN:], test, source=f"torchvision ({root})")


def load_mnist(path: str | os.PathLike | None = None, cache: Path | None = None) -> Mnist:
    """MNIST from the first source that works (see the module docstring)."""
    if path is not None:
        return from_path(path, "--mnist")
    if os.environ.get(ENV_VAR):
        return from_path(os.environ[ENV_VAR], ENV_VAR)
    if cache is None:
        cache = data_dir() / "mnist"
    tried = [f"no --mnist path given and {ENV_VAR} is not set"]
    if all(_find_idx(cache, stem) for stem in IDX_FILES.values()):
        try:
            return _from_idx_dir(cache)
        except InputError as e:
            tried.append(f"cached copy: {e} (removed)")
            for stem in IDX_FILES.values():
                (cache / f"{stem}.gz").unlink(missing_ok=True)
    else:
        tried.append(f"no cached copy in {cache}")
    try:
        _download(cache)
        return _from_idx_dir(cache)
    except (OSError, InputError) as e:
        tried.append(f"download from {', '.join(MIRRORS)} failed: {e}")
    try:
        return _from_torchvision(cache)
    except ImportError:
        tried.append("torchvision is not installed")
    except Exception as e:  # network / format problems inside torchvision
        tried.append(f"torchvision download failed: {type(e).__name__}: {e}")
    raise InputError("MNIST is needed for flying_mnist but no copy was found:\n  - "
                     + "\n  - ".join(tried) + f"\n{FIX}")
