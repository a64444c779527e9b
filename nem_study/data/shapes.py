"""Binary shape sprites and the static shapes data set (NEM_SPEC.md §4).

Two sprite sets (``DataConfig.sprites``), each a 7x7 square and two 7x12 triangles (apex up,
apex down = apex up flipped vertically), indexed by the sprite type drawn per object (0 square,
1 triangle up, 2 triangle down):

* ``"binding"`` (default): the 2-pixel-thick shapes of the Binding-via-Reconstruction-Clustering
  shapes data that the paper cites, as drawn in NEM_SPEC.md §4 and in the authors' README
  figure: a square with a 3x3 hole (40 on-pixels) and triangles of 48 on-pixels;
* ``"outline"``: the 1-pixel outlines this project used before (24 on-pixels each).

:func:`sprite_set` returns a set's arrays; the module-level :data:`SPRITES` are the default set's.

Rendering is vectorised: every object's on-pixels become flat indices into the output block,
and the label map is updated with one gather and one scatter per object (no per-image loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

BACKGROUND = 0
OVERLAP = 255

SPRITE_NAMES = ("square", "triangle_up", "triangle_down")
SPRITE_SETS = ("binding", "outline")
DEFAULT_SET = "binding"

# The pictures of NEM_SPEC.md §4, '#' = on.
_BINDING_SQUARE = """
#######
#######
##...##
##...##
##...##
#######
#######
"""
_BINDING_TRIANGLE_UP = """
.....##.....
....####....
...######...
..###..###..
.###....###.
############
############
"""


def _picture(text: str) -> np.ndarray:
    rows = text.strip().splitlines()
    return np.array([[c == "#" for c in r] for r in rows], bool)


def _outline_square(n: int = 7) -> np.ndarray:
    s = np.zeros((n, n), bool)
    s[0, :] = s[-1, :] = s[:, 0] = s[:, -1] = True
    return s


def _outline_triangle_up(h: int = 7, w: int = 12) -> np.ndarray:
    """Outline triangle, apex (2 px wide) on top, full base at the bottom: h rows, w columns."""
    t = np.zeros((h, w), bool)
    mid = w // 2
    for r in range(h - 1):
        t[r, mid - 1 - r] = t[r, mid + r] = True
    t[h - 1, :] = True
    return t


@dataclass(frozen=True)
class SpriteSet:
    """One sprite set: the sprites (read-only bool arrays), ``size`` (n, 2) their (height, width),
    ``offsets`` (n, P, 2) the row/column offsets of their on-pixels, padded by repeating the first
    pixel (a repeated pixel is written twice with the same value, which is harmless)."""

    name: str
    sprites: tuple[np.ndarray, ...]
    size: np.ndarray
    offsets: np.ndarray


def sprite_set(name: str = DEFAULT_SET) -> SpriteSet:
    """The sprite set ``name`` (one of :data:`SPRITE_SETS`), built once per process."""
    return _build(name)


@cache
def _build(name: str) -> SpriteSet:
    if name == "binding":
        square, up = _picture(_BINDING_SQUARE), _picture(_BINDING_TRIANGLE_UP)
    elif name == "outline":
        square, up = _outline_square(), _outline_triangle_up()
    else:
        raise ValueError(f"sprite set must be one of {', '.join(SPRITE_SETS)}, got {name!r}")
    sprites = (square, up, up[::-1].copy())
    for s in sprites:
        s.setflags(write=False)
    pts = [np.argwhere(s) for s in sprites]
    p = max(len(q) for q in pts)
    offsets = np.empty((len(pts), p, 2), np.int64)
    for i, q in enumerate(pts):
        offsets[i, : len(q)] = q
        offsets[i, len(q):] = q[0]
    size = np.array([s.shape for s in sprites], dtype=np.int64)
    for a in (size, offsets):
        a.setflags(write=False)
    return SpriteSet(name, sprites, size, offsets)


SPRITES = sprite_set().sprites


def render_sprites(types: np.ndarray, top: np.ndarray, left: np.ndarray, size: int,
                   sprites: str = DEFAULT_SET) -> tuple[np.ndarray, np.ndarray]:
    """Draw sprites of the set ``sprites`` into binary frames and label maps.

    types: (B, K) sprite type per object; top, left: (B, T, K) top-left corner per frame (the
    caller guarantees the sprite lies fully inside the ``size`` x ``size`` frame).
    Returns images (B, T, size, size) uint8 in {0, 1} (OR of the sprites) and labels of the same
    shape: 0 background, k + 1 where only object k is on, :data:`OVERLAP` where two or more are.
    """
    offsets = sprite_set(sprites).offsets
    b, t, k = top.shape
    labels = np.zeros((b, t, size, size), np.uint8)
    flat = labels.reshape(-1)
    frame = (np.arange(b * t, dtype=np.int64) * (size * size)).reshape(b, t, 1)
    for obj in range(k):
        off = offsets[types[:, obj]]  # (B, P, 2)
        rows = top[:, :, obj, None] + off[:, None, :, 0]  # (B, T, P)
        cols = left[:, :, obj, None] + off[:, None, :, 1]
        idx = (frame + rows * size + cols).reshape(-1)
        cur = flat[idx]
        # gather-before-scatter: a pixel this object has already set cannot be read back here
        flat[idx] = np.where(cur == BACKGROUND, np.uint8(obj + 1), np.uint8(OVERLAP))
    images = (labels != BACKGROUND).view(np.uint8)
    return images, labels


def draw_static(rng: np.random.Generator, count: int, objects: int, size: int,
                sprites: str = DEFAULT_SET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random static layout: sprite types uniform over the three sprites, top-left corners
    uniform over all integer positions that keep the sprite fully inside the frame (overlaps
    allowed). Draw order is fixed (types, then positions) so a block's layout is reproducible;
    it is the same for every sprite set (the set only changes the extents).
    Returns types (count, K) and top, left (count, 1, K)."""
    ss = sprite_set(sprites)
    types = rng.integers(0, len(ss.sprites), size=(count, objects))
    u = rng.random((count, objects, 2))
    room = size - ss.size[types] + 1  # (count, K, 2) number of valid corners per axis
    corner = np.minimum(np.floor(u * room).astype(np.int64), room - 1)
    return types, corner[:, None, :, 0], corner[:, None, :, 1]
