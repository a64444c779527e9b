"""Binary shape sprites and the static shapes data set (NEM_SPEC.md §4).

The sprites follow the shapes data of the earlier binding / Tagger work: outline shapes, a
7x7 square and two 7x12 triangles (apex up, apex down). All three have 24 "on" pixels. Each
sprite is stored as a boolean array; :data:`SPRITES` is indexed by the sprite type drawn per
object (0 square, 1 triangle up, 2 triangle down).

Rendering is vectorised: every object's on-pixels become flat indices into the output block,
and the label map is updated with one gather and one scatter per object (no per-image loop).
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
OVERLAP = 255


def _square(n: int = 7) -> np.ndarray:
    s = np.zeros((n, n), bool)
    s[0, :] = s[-1, :] = s[:, 0] = s[:, -1] = True
    return s


def _triangle_up(h: int = 7, w: int = 12) -> np.ndarray:
    """Outline triangle, apex (2 px wide) on top, full base at the bottom: h rows, w columns."""
    t = np.zeros((h, w), bool)
    mid = w // 2
    for r in range(h - 1):
        t[r, mid - 1 - r] = t[r, mid + r] = True
    t[h - 1, :] = True
    return t


SPRITE_NAMES = ("square", "triangle_up", "triangle_down")
SPRITES: tuple[np.ndarray, ...] = (_square(), _triangle_up(), _triangle_up()[::-1].copy())
for _s in SPRITES:
    _s.setflags(write=False)

#: (height, width) of each sprite
SPRITE_SIZE = np.array([s.shape for s in SPRITES], dtype=np.int64)
#: largest sprite extent, the smallest frame that can hold every sprite
MIN_FRAME = int(SPRITE_SIZE.max())


def _offsets() -> np.ndarray:
    """(n_sprites, P, 2) row/column offsets of the on-pixels, padded by repeating the first pixel
    (a repeated pixel is written twice with the same value, which is harmless)."""
    pts = [np.argwhere(s) for s in SPRITES]
    p = max(len(q) for q in pts)
    out = np.empty((len(pts), p, 2), np.int64)
    for i, q in enumerate(pts):
        out[i, : len(q)] = q
        out[i, len(q):] = q[0]
    return out


SPRITE_OFFSETS = _offsets()


def render_sprites(types: np.ndarray, top: np.ndarray, left: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw sprites into binary frames and label maps.

    types: (B, K) sprite type per object; top, left: (B, T, K) top-left corner per frame (the
    caller guarantees the sprite lies fully inside the ``size`` x ``size`` frame).
    Returns images (B, T, size, size) uint8 in {0, 1} (OR of the sprites) and labels of the same
    shape: 0 background, k + 1 where only object k is on, :data:`OVERLAP` where two or more are.
    """
    b, t, k = top.shape
    labels = np.zeros((b, t, size, size), np.uint8)
    flat = labels.reshape(-1)
    frame = (np.arange(b * t, dtype=np.int64) * (size * size)).reshape(b, t, 1)
    for obj in range(k):
        off = SPRITE_OFFSETS[types[:, obj]]  # (B, P, 2)
        rows = top[:, :, obj, None] + off[:, None, :, 0]  # (B, T, P)
        cols = left[:, :, obj, None] + off[:, None, :, 1]
        idx = (frame + rows * size + cols).reshape(-1)
        cur = flat[idx]
        # gather-before-scatter: a pixel this object has already set cannot be read back here
        flat[idx] = np.where(cur == BACKGROUND, np.uint8(obj + 1), np.uint8(OVERLAP))
    images = (labels != BACKGROUND).view(np.uint8)
    return images, labels


def draw_static(rng: np.random.Generator, count: int, objects: int, size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random static layout: sprite types uniform over the three sprites, top-left corners
    uniform over all integer positions that keep the sprite fully inside the frame (overlaps
    allowed). Draw order is fixed (types, then positions) so a block's layout is reproducible.
    Returns types (count, K) and top, left (count, 1, K)."""
    types = rng.integers(0, len(SPRITES), size=(count, objects))
    u = rng.random((count, objects, 2))
    room = size - SPRITE_SIZE[types] + 1  # (count, K, 2) number of valid corners per axis
    corner = np.minimum(np.floor(u * room).astype(np.int64), room - 1)
    return types, corner[:, None, :, 0], corner[:, None, :, 1]
