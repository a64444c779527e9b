"""The data as a pure function of (spec, split): seeding, blocks, and dispatch per data set.

Sequences are generated in blocks of :data:`BLOCK`. Block ``b`` of a split draws its random
layout from ``np.random.Generator(PCG64(SeedSequence([spec.seed, split_index, b])))`` and always
draws a full block (extra rows are dropped), so

* the same spec gives byte-identical arrays in every run and process, on every machine;
* train / valid / test (split_index 0 / 1 / 2) and different seeds give different data;
* the first ``n`` sequences do not depend on how many are generated (``generate(spec, s, 10)``
  equals ``generate(spec, s)[:10]``), and blocks can be rendered one at a time with bounded
  memory (which is how :mod:`store` writes 50,000 x 21 frames).

What is drawn (NEM_SPEC.md §4): the sprites ``spec.sprites`` (:mod:`shapes`; 2-pixel-thick
Binding shapes by default) and the motion ``spec.motion`` (:mod:`sequences`; whole-pixel
velocities in {-1, 0, +1} with exact reflection by default, for flying shapes and flying MNIST).

Changing anything here changes the data: bump ``store.FORMAT_VERSION`` with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from nem_study.capacity import check_in_memory
from nem_study.config import SPLITS, DataConfig, InputError
import nem_study.data.sequences as sequences
import nem_study.data.shapes as shapes
from nem_study.data.mnist import Mnist, load_mnist

BLOCK = 1000

MnistArg = Mnist | str | os.PathLike | None


@dataclass
class Layout:
    """What was drawn: enough to re-render the data independently (tests, plots).

    ids: (N, K) sprite type, an index into ``pool`` = ``shapes.sprite_set(spec.sprites).sprites``,
    or digit index into ``pool`` = the split's down-sampled digit pool (P, S, S).
    top, left: (N, T, K) corners.
    """

    ids: np.ndarray
    top: np.ndarray
    left: np.ndarray
    pool: tuple[np.ndarray, ...] | np.ndarray


def check(spec: DataConfig, split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if spec.name != "flying_mnist":
        need = int(shapes.sprite_set(spec.sprites).size.max())
        if spec.image_size < need:
            raise InputError(f"data.image_size = {spec.image_size} is too small for the shape sprites "
                             f"(up to {need} px wide); use at least {need}")


def count(spec: DataConfig, split: str) -> int:
    return int(getattr(spec, split))


def _rng(spec: DataConfig, split: str, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([spec.seed, SPLITS.index(split), block]))


def _pool(spec: DataConfig, split: str, mnist: MnistArg):
    if spec.name != "flying_mnist":
        return shapes.sprite_set(spec.sprites).sprites
    if not isinstance(mnist, Mnist):
        mnist = load_mnist(mnist)
    return mnist.pool(spec, split)


def _draw_block(spec: DataConfig, split: str, block: int, pool_size: int):
    rng = _rng(spec, split, block)
    k, size = spec.objects, spec.image_size
    if spec.is_static:
        return shapes.draw_static(rng, BLOCK, k, size, spec.sprites)
    if spec.name == "flying_shapes":
        sprites = shapes.sprite_set(spec.sprites)
        ids = rng.integers(0, len(sprites.sprites), size=(BLOCK, k))
        extent = sprites.size[ids]
    else:
        ids = rng.integers(0, pool_size, size=(BLOCK, k))
        extent = np.full((BLOCK, k, 2), spec.digit_size, np.int64)
    top, left = sequences.draw_motion(rng, extent, spec.frames, size, spec.motion)
    return ids, top, left


def _blocks(spec: DataConfig, split: str, n: int | None, pool) -> Iterator[tuple[int, tuple]]:
    check(spec, split)
    n = count(spec, split) if n is None else int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for block, start in enumerate(range(0, n, BLOCK)):
        rows = min(BLOCK, n - start)
        ids, top, left = _draw_block(spec, split, block, len(pool))
        yield start, (ids[:rows], top[:rows], left[:rows])


def _render(spec: DataConfig, pool, ids, top, left) -> tuple[np.ndarray, np.ndarray]:
    if spec.name == "flying_mnist":
        return sequences.render_digits(pool[ids], top, left, spec.image_size, spec.overlap)
    return shapes.render_sprites(ids, top, left, spec.image_size, spec.sprites)


def iter_blocks(spec: DataConfig, split: str, n: int | None = None, mnist: MnistArg = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the split, block by block (each up to :data:`BLOCK` sequences)."""
    pool = _pool(spec, split, mnist)
    for _, (ids, top, left) in _blocks(spec, split, n, pool):
        yield _render(spec, pool, ids, top, left)


def generate(spec: DataConfig, split: str, n: int | None = None, mnist: MnistArg = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels, uint8 (N, T, H, W), of the first ``n`` sequences (default: all) of a split.

    Images: binary data as 0/1, grey-scale as 0..255. Labels: 0 background, 1..K the object,
    255 where two or more objects overlap. ``mnist``: a loaded :class:`Mnist`, a path, or None
    (see :func:`mnist.load_mnist`); only flying_mnist needs it.
    """
    check(spec, split)
    n = count(spec, split) if n is None else int(n)
    check_in_memory(spec, split, n)  # before np.empty: a size that cannot fit is one InputError
    shape = (n, spec.frames, spec.image_size, spec.image_size)
    images, labels = np.empty(shape, np.uint8), np.empty(shape, np.uint8)
    pool = _pool(spec, split, mnist)
    for start, (ids, top, left) in _blocks(spec, split, n, pool):
        im, lab = _render(spec, pool, ids, top, left)
        images[start:start + len(im)], labels[start:start + len(im)] = im, lab
    return images, labels


def layout(spec: DataConfig, split: str, n: int | None = None, mnist: MnistArg = None) -> Layout:
    """The drawn layout of the first ``n`` sequences (same draws as :func:`generate`)."""
    pool = _pool(spec, split, mnist)
    parts = [p for _, p in _blocks(spec, split, n, pool)]
    if not parts:
        k, t = spec.objects, spec.frames
        empty = np.zeros((0, t, k), np.int64)
        return Layout(np.zeros((0, k), np.int64), empty, empty.copy(), pool)
    ids, top, left = (np.concatenate(a) for a in zip(*parts))
    return Layout(ids, top, left, pool)
