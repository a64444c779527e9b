"""Motion and frame compositing for the flying data sets (NEM_SPEC.md §4).

Motion (``DataConfig.motion``); every object starts at a uniformly random integer position that
keeps it fully inside the frame, and bounces off the walls. The corner of an object of extent
``e`` lives in ``[0, room - 1]`` with ``room = size - e + 1`` per axis, so it is never clipped.

* ``"unit"`` (default, the authors' flying shapes): a whole-pixel velocity in {-1, 0, +1} per
  axis, drawn uniformly and independently per axis (so about 1 object in 9 stands still), with
  exact reflection: the sprite touches the wall and comes back (... room-2, room-1, room-2 ...).
  Every step is then predictable from the previous two positions except at a bounce. Closed
  form in integers: a triangle wave of period ``2 (room - 1)`` (:func:`fold_int`).
* ``"continuous"`` (this project's earlier data): a random direction (uniform on the circle)
  and a speed uniform in :data:`SPEED_RANGE` pixels per frame; the continuous corner ``c`` lives
  in ``[0, room]``, the straight line is folded into it by a real triangle wave (:func:`fold`)
  and the pixel position is ``min(floor(c), room - 1)``. The direction is drawn by rejection
  sampling from the square (8 candidates per object; if all 8 are rejected, which happens about
  once in 40,000 objects, the first candidate is normalised).

Both use only IEEE-exact operations (integers; +, *, floor, sqrt; no sin/cos), so the same seed
gives byte-identical data on every machine. Trajectories are computed for all sequences, frames
and objects at once.

Flying MNIST uses ``"unit"`` too (``DataConfig`` resolves ``motion=None`` to it for every
flying data set). There is no flying-MNIST-specific evidence on the digits' velocities: the
paper says only that they start at random positions and move along random (bouncing)
trajectories (NEM_SPEC.md §4), and the authors' code (sjoerdvansteenkiste/Neural-EM) only reads
their pre-made ``flying_mnist_{medium20,medium500,hard}_2digits.h5`` files (``datasets.py``;
README.md, nem.py, utils.py say nothing of motion). Their one published sequence (flying shapes,
the README figure) moves objects by whole pixels, at most 1 px per frame, so the same motion for
both flying data sets is the consistent choice; ``motion=continuous`` keeps the other one.

Compositing: binary shapes are the OR of the sprites (see :func:`shapes.render_sprites`), grey
digits the max of the intensities (``overlap="max"``) or their sum clipped at 255
(``"clip_sum"``). A digit covers a pixel where its down-sampled uint8 ink is > 0
(:data:`INK_THRESHOLD`), which is the spec's "non-zero ink".
"""

from __future__ import annotations

import numpy as np

from nem_study.data.shapes import BACKGROUND, OVERLAP

#: "continuous" motion: speed of every object, uniform in this range (pixels per frame)
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


def fold_int(p: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Reflect the unbounded integer coordinate ``p`` into ``[0, hi]`` (an integer triangle wave
    of period ``2 hi``; ``hi == 0`` gives 0: no movement possible on that axis)."""
    period = np.maximum(2 * hi, 1)
    return hi - np.abs(np.mod(p, period) - hi)  # np.mod of ints by a positive divisor is >= 0


MOTIONS = ("unit", "continuous")


def draw_motion(rng: np.random.Generator, extent: np.ndarray, frames: int, size: int,
                motion: str = "unit") -> tuple[np.ndarray, np.ndarray]:
    """Bouncing straight-line trajectories (``motion``: one of :data:`MOTIONS`).

    extent: (B, K, 2) object height/width. Returns the top-left corners ``top, left`` as int64
    arrays of shape (B, frames, K); the object always lies fully inside the frame.
    Draw order (fixed): start positions, then velocities ("unit": one integer draw; "continuous":
    directions, then speeds).
    """
    if motion == "unit":
        return _unit_motion(rng, extent, frames, size)
    if motion == "continuous":
        return _continuous_motion(rng, extent, frames, size)
    raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}")


def _unit_motion(rng: np.random.Generator, extent: np.ndarray, frames: int, size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    b, k, _ = extent.shape
    room = (size - extent + 1).astype(np.int64)  # (B, K, 2) valid corners per axis
    # floor(u * room) as in draw_static: uniform integers in [0, room - 1], IEEE-exact
    start = np.minimum(np.floor(rng.random((b, k, 2)) * room).astype(np.int64), room - 1)
    velocity = rng.integers(-1, 2, size=(b, k, 2))  # {-1, 0, +1} per axis
    t = np.arange(frames, dtype=np.int64)[None, :, None, None]
    pos = fold_int(start[:, None] + velocity[:, None] * t, room[:, None] - 1)  # (B, T, K, 2)
    return pos[..., 0], pos[..., 1]


def _continuous_motion(rng: np.random.Generator, extent: np.ndarray, frames: int, size: int
                       ) -> tuple[np.ndarray, np.ndarray]:
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
