"""Motion and frame compositing for the flying data sets (NEM_SPEC.md §4).

Motion: each object starts at a uniformly random integer position that keeps it fully inside
the frame and moves along a straight line with a random direction (uniform on the circle) and
a random speed, uniform in :data:`SPEED_RANGE` pixels per frame. It bounces elastically off the
walls. The trajectory is computed in closed form for all sequences, frames and objects at once:
the continuous coordinate ``c`` of the top-left corner lives in ``[0, room]`` with
``room = size - extent + 1``; the unbounded straight line is folded into that interval by a
triangle wave (which *is* reflection at the walls), and the pixel position is
``min(floor(c), room - 1)``, so the object is never clipped.

Everything uses only IEEE-exact operations (+, *, floor, sqrt; no sin/cos), so the same seed
gives byte-identical data on every machine. The direction is drawn by rejection sampling from
the square (8 candidates per object; if all 8 are rejected, which happens about once in 40,000
objects, the first candidate is normalised).

Compositing: binary shapes are the OR of the sprites (see :func:`shapes.render_sprites`), grey
digits the max of the intensities (``overlap="max"``) or their sum clipped at 255
(``"clip_sum"``). A digit covers a pixel where its down-sampled uint8 ink is > 0
(:data:`INK_THRESHOLD`), which is the spec's "non-zero ink".
"""

from __future__ import annotations

import numpy as np

from nem_study.data.shapes import BACKGROUND, OVERLAP

#: speed of every object, uniform in this range (pixels per frame)
SPEED_RANGE = (1.0, 3.0)
#: a digit covers a pixel where its uint8 ink is >= this
INK_THRESHOLD = 1
_CANDIDATES = 8


def _directions(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit vectors uniform on the circle, shape (*shape, 2), without trigonometric functions."""
    cand = rng.random((*shape, _CANDIDATES, 2)) * 2.0 - 1.0
    r2 = cand[..., 0] * cand[..., 0] + cand[..., 1] * cand[..., 1]
    ok = (r2 > 1.0 / 16.0) & (r2 <= 1.0)
    first = np.argmax(ok, axis=-1)[..., None]  # 0 when nothing was accepted
    pick = np.take_along_axis(cand, first[..., None], axis=-2)[..., 0, :]
    r = np.sqrt(np.take_along_axis(r2, first, axis=-1))
    return pick / np.maximum(r, 1e-12)


def fold(c: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Reflect the unbounded coordinate ``c`` into ``[0, room]`` (a triangle wave)."""
    return room - np.abs(np.mod(c, 2.0 * room) - room)


def draw_motion(rng: np.random.Generator, extent: np.ndarray, frames: int, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Bouncing straight-line trajectories.

    extent: (B, K, 2) object height/width. Returns the top-left corners ``top, left`` as int64
    arrays of shape (B, frames, K); the object always lies fully inside the frame.
    Draw order (fixed): start positions, directions, speeds.
    """
    b, k, _ = extent.shape
    room = (size - extent + 1).astype(np.float64)  # (B, K, 2)
    start = rng.random((b, k, 2)) * room
    direction = _directions(rng, (b, k))
    lo, hi = SPEED_RANGE
    speed = lo + (hi - lo) * rng.random((b, k))
    velocity = direction * speed[..., None]
    t = np.arange(frames, dtype=np.float64)[None, :, None, None]
    c = fold(start[:, None] + velocity[:, None] * t, room[:, None])  # (B, T, K, 2)
    pos = np.minimum(np.floor(c).astype(np.int64), (room[:, None] - 1).astype(np.int64))
    return pos[..., 0], pos[..., 1]


def render_digits(patches: np.ndarray, top: np.ndarray, left: np.ndarray, size: int,
                  overlap: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Composite grey digits into frames and label maps.

    patches: (B, K, S, S) uint8 digit per object; top, left: (B, T, K) corners (inside the frame).
    Returns images (B, T, size, size) uint8 0..255 and labels (0 background, k + 1 where only
    object k has ink, :data:`OVERLAP` where two or more do).
    """
    b, t, k = top.shape
    s = patches.shape[-1]
    images = np.zeros((b, t, size, size), np.uint8)
    labels = np.zeros_like(images)
    fi, fl = images.reshape(-1), labels.reshape(-1)
    itype = np.int32 if images.size < 2**31 else np.int64
    frame = (np.arange(b * t, dtype=itype) * itype(size * size)).reshape(b, t, 1)
    grid = (np.arange(s, dtype=itype)[:, None] * size + np.arange(s, dtype=itype)).reshape(1, 1, -1)
    for obj in range(k):
        corner = (top[:, :, obj] * size + left[:, :, obj]).astype(itype)[..., None]
        idx = (frame + corner + grid).reshape(-1)  # (B * T * S * S,)
        ink = np.broadcast_to(patches[:, obj].reshape(b, 1, s * s), (b, t, s * s)).reshape(-1)
        cur = fi[idx]
        if overlap == "max":
            fi[idx] = np.maximum(cur, ink)
        elif overlap == "clip_sum":
            fi[idx] = np.minimum(cur.astype(np.uint16) + ink, 255).astype(np.uint8)
        else:
            raise ValueError(f"overlap must be 'max' or 'clip_sum', got {overlap!r}")
        lab = fl[idx]
        new = np.where(lab == BACKGROUND, np.uint8(obj + 1), np.uint8(OVERLAP))
        fl[idx] = np.where(ink >= INK_THRESHOLD, new, lab)
    return images, labels
