"""Data sets (nem_study.data): determinism, labels, motion, the Arrow store, MNIST sources."""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import pytest

from nem_study import data
from nem_study.config import DataConfig, InputError
from nem_study.data import synth
from nem_study.data import mnist as mnist_mod
from nem_study.data import shapes, store

NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist.npz"
needs_mnist = pytest.mark.skipif(not NPZ.is_file(), reason=f"{NPZ} not present")


def spec(name="flying_shapes", **kw) -> DataConfig:
    sizes = {"train": 24, "valid": 6, "test": 5}
    return DataConfig(name=name, **(sizes | kw))


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("NEM_DATA_DIR", str(d))
    monkeypatch.delenv("NEM_MNIST", raising=False)
    return d


@pytest.fixture(scope="module")
def mnist():
    if not NPZ.is_file():
        pytest.skip(f"{NPZ} not present")
    return data.load_mnist(NPZ)


def reference(s: DataConfig, lay: data.Layout):
    """Re-render a layout with plain loops and slicing: images, labels, per-object masks."""
    n, t, k = lay.top.shape
    size = s.image_size
    images = np.zeros((n, t, size, size), np.int64)
    masks = np.zeros((n, t, k, size, size), bool)
    for i in range(n):
        for f in range(t):
            for o in range(k):
                patch = np.asarray(lay.pool[lay.ids[i, o]]).astype(np.int64)
                y, x = lay.top[i, f, o], lay.left[i, f, o]
                h, w = patch.shape
                assert 0 <= y and y + h <= size and 0 <= x and x + w <= size, "object leaves the frame"
                canvas = np.zeros((size, size), np.int64)
                canvas[y:y + h, x:x + w] = patch
                masks[i, f, o] = canvas > 0
                if s.grey and s.overlap == "clip_sum":
                    images[i, f] = np.minimum(images[i, f] + canvas, 255)
                else:
                    images[i, f] = np.maximum(images[i, f], canvas)
    cover = masks.sum(axis=2)
    owner = masks.argmax(axis=2) + 1
    labels = np.where(cover == 0, 0, np.where(cover == 1, owner, 255))
    return images.astype(np.uint8), labels.astype(np.uint8), masks


# ----------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("name", ["static_shapes", "flying_shapes"])
def test_same_spec_same_bytes_other_seed_or_split_differs(name):
    a = data.generate(spec(name), "train")
    b = data.generate(spec(name), "train")
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].dtype == np.uint8 and a[0].shape[:2] == (24, 1 if name == "static_shapes" else 21)
    c = data.generate(spec(name, seed=1), "train")
    assert not np.array_equal(a[0], c[0])
    v = data.generate(spec(name), "valid", n=24)
    assert not np.array_equal(a[0], v[0])


def test_first_n_do_not_depend_on_n_across_blocks():
    s = spec("static_shapes")
    many, many_lab = data.generate(s, "train", n=synth.BLOCK + 5)
    few, few_lab = data.generate(s, "train", n=7)
    assert np.array_equal(many[:7], few) and np.array_equal(many_lab[:7], few_lab)
    assert not np.array_equal(many[synth.BLOCK:synth.BLOCK + 5], many[:5])  # blocks differ
    blocks = list(data.iter_blocks(s, "train", n=synth.BLOCK + 5))
    assert [len(b[0]) for b in blocks] == [synth.BLOCK, 5]
    assert np.array_equal(np.concatenate([b[0] for b in blocks]), many)


# ----------------------------------------------------------------------------------------
# Labels, frame, motion


def on_pixels(lay: data.Layout) -> np.ndarray:
    """(N, K) on-pixels of each object's sprite."""
    return np.array([np.count_nonzero(p) for p in lay.pool])[lay.ids]


def extents(lay: data.Layout) -> np.ndarray:
    """(N, K, 2) height / width of each object."""
    return np.array([np.shape(p) for p in lay.pool], np.int64)[lay.ids]


# The pictures of NEM_SPEC.md §4, copied literally ('#' = on).
SPEC_SQUARE = """
#######
#######
##...##
##...##
##...##
#######
#######
"""
SPEC_TRIANGLE_UP = """
.....##.....
....####....
...######...
..###..###..
.###....###.
############
############
"""


def _ascii(a: np.ndarray) -> str:
    return "\n" + "\n".join("".join("#" if v else "." for v in row) for row in a) + "\n"


def test_binding_sprites_are_the_pictures_of_the_spec():
    square, up, down = shapes.sprite_set("binding").sprites
    assert _ascii(square) == SPEC_SQUARE and _ascii(up) == SPEC_TRIANGLE_UP
    assert _ascii(down[::-1]) == SPEC_TRIANGLE_UP  # triangle down = triangle up flipped vertically
    assert [s.shape for s in (square, up, down)] == [(7, 7), (7, 12), (7, 12)]
    assert [int(s.sum()) for s in (square, up, down)] == [40, 48, 48]
    assert shapes.SPRITES is shapes.sprite_set().sprites is shapes.sprite_set("binding").sprites  # default
    assert all(not s.flags.writeable for s in shapes.SPRITES)
    outline = shapes.sprite_set("outline").sprites
    assert [int(s.sum()) for s in outline] == [24, 24, 24] and outline[0][1:-1, 1:-1].sum() == 0
    assert shapes.sprite_set().size.tolist() == [[7, 7], [7, 12], [7, 12]]
    with pytest.raises(ValueError, match="sprite set"):
        shapes.sprite_set("thick")


# sha256 of images + labels of the first 12 train sequences (seed 7), computed with the generator
# before data.sprites / data.motion existed: "outline" + "continuous" must stay that data.
BEFORE = {"static_shapes": "ce249846ff4d1a71d52edbbf979d82942e44305f38925d0e22c8a9af8df942a1",
          "flying_shapes": "31edee7b7111e755bf4ec624c56f50ddaca6e81f0d268bfd3547b71bf5ddd6a8",
          "flying_mnist": "096a95a72be61aa4f87ab7c7131abea86a2ed2b1a3778577e91fabf1bbe6fd53"}


@pytest.mark.parametrize("name", ["static_shapes", "flying_shapes",
                                  pytest.param("flying_mnist", marks=needs_mnist)])
def test_outline_and_continuous_reproduce_the_earlier_data_byte_for_byte(name):
    import hashlib

    motion = {} if name == "static_shapes" else {"motion": "continuous"}
    s = spec(name, seed=7, sprites="outline", **motion)
    images, labels = data.generate(s, "train", n=12, mnist=NPZ if name == "flying_mnist" else None)
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == BEFORE[name]


def test_defaults_are_binding_sprites_and_unit_motion():
    assert spec("flying_shapes").sprites == "binding" and spec("flying_shapes").motion == "unit"
    assert spec("flying_mnist").motion == "unit" and spec("static_shapes").motion is None
    images, _ = data.generate(spec("flying_shapes", objects=1, train=30), "train")
    assert set(np.unique(images.sum(axis=(-1, -2)))) <= {40, 48}


@pytest.mark.parametrize("s", [spec("static_shapes", train=40), spec("flying_shapes", objects=5, train=12),
                               spec("flying_shapes", objects=5, train=12, sprites="outline", motion="continuous")],
                         ids=["static", "flying5", "flying5-outline-continuous"])
def test_shapes_match_an_independent_render(s):
    images, labels = data.generate(s, "train")
    lay = data.layout(s, "train")
    assert lay.pool is shapes.sprite_set(s.sprites).sprites
    ref_img, ref_lab, masks = reference(s, lay)
    assert np.array_equal(images, ref_img)
    assert np.array_equal(labels, ref_lab)
    assert set(np.unique(images)) <= {0, 1}
    # on-pixel <=> labelled; overlap exactly where >= 2 masks; single owner elsewhere
    assert np.array_equal(images == 1, labels != data.BACKGROUND)
    assert np.array_equal(labels == data.OVERLAP, masks.sum(2) >= 2)
    assert (labels == data.OVERLAP).any() and set(np.unique(labels)) <= {0, *range(1, s.objects + 1), 255}
    # every object keeps its full sprite (40 / 48 px, outline 24) in every frame: never clipped
    assert (masks.sum(axis=(-1, -2)) == on_pixels(lay)[:, None]).all()


@pytest.mark.parametrize("motion", ["unit", "continuous"])
def test_single_object_never_clipped_and_moving(motion):
    s = spec("flying_shapes", objects=1, train=64, motion=motion)
    images, labels = data.generate(s, "train")
    lay = data.layout(s, "train")
    assert (images.sum(axis=(-1, -2)) == on_pixels(lay)).all()  # (N, T) == (N, 1): no pixel lost at a wall
    assert np.array_equal(labels, images)  # one object: label 1 exactly where on
    moved = (images[:, 1:] != images[:, :-1]).any(axis=(-1, -2))  # (N, T - 1)
    if motion == "continuous":
        assert moved.mean() > 0.9 and moved.any(axis=1).all()  # every sequence moves
    else:  # an object moves in every frame unless its velocity is (0, 0): then never
        pos = np.stack([lay.top[:, :, 0], lay.left[:, :, 0]], -1)
        still = (pos == pos[:, :1]).all(axis=(1, 2))
        assert np.array_equal(moved, np.broadcast_to(~still[:, None], moved.shape))
        assert 0 < still.sum() < 64 // 3


@pytest.mark.parametrize("motion", ["unit", "continuous"])
def test_motion_bounces_inside_the_frame(motion):
    s = spec("flying_shapes", train=200, motion=motion)
    lay = data.layout(s, "train")
    room = s.image_size - extents(lay)[:, None]  # (N, 1, K, 2) largest valid corner
    pos = np.stack([lay.top, lay.left], -1)
    assert (pos >= 0).all() and (pos <= room).all()
    assert (pos == 0).any() and (pos == room).any()  # walls are reached
    step = np.diff(pos, axis=1)
    reversed_ = (step[:, :-1] * step[:, 1:] < 0).any(axis=(1, 3))
    assert reversed_.mean() > 0.5  # most sequences have an object that bounced
    speed = np.abs(step).max(-1)
    # |v| <= 3 px / frame, or 1 px per axis (a reflection never adds distance)
    assert speed.max() == (1 if motion == "unit" else 3)
    images, _ = data.generate(s, "train")
    changed = (images[:, 1:] != images[:, :-1]).any(axis=(-1, -2))
    assert np.array_equal(changed, (step != 0).any(axis=(2, 3)))  # frames differ <=> something moved


def _unit_motion_checks(pos: np.ndarray, hi: np.ndarray) -> None:
    """pos: (N, T, K, 2) corners, hi: (N, 1, K, 2) largest valid corner, under unit motion."""
    assert (pos >= 0).all() and (pos <= hi).all()  # always inside the frame
    step = np.diff(pos, axis=1)  # (N, T - 1, K, 2)
    assert np.abs(step).max() == 1  # whole pixels, at most 1 px per axis and frame
    # constant velocity except at a bounce, and a bounce reflects exactly at the wall
    at_wall = ((pos == 0) | (pos == hi))[:, 1:-1]
    same = step[:, 1:] == step[:, :-1]
    assert (same | at_wall).all()
    bounce = ~same
    assert (step[:, 1:][bounce] == -step[:, :-1][bounce]).all()
    assert (np.abs(step[:, 1:]) == np.abs(step[:, :-1])).all()  # speed per axis never changes
    assert (step[:, :, :][np.broadcast_to(hi == 0, step.shape)] == 0).all()  # room 1: no movement
    # a constant-velocity predictor is right on every step that does not start at a wall
    predicted = 2 * pos[:, 1:-1] - pos[:, :-2]
    assert (predicted == pos[:, 2:])[~at_wall].all()


def test_unit_motion_is_whole_pixel_predictable_and_reflects_exactly():
    s = spec("flying_shapes", train=500)
    lay = data.layout(s, "train")
    pos = np.stack([lay.top, lay.left], -1)  # (N, T, K, 2)
    hi = s.image_size - extents(lay)[:, None]
    _unit_motion_checks(pos, hi)
    step = np.diff(pos, axis=1)
    # velocity per axis uniform on {-1, 0, +1}: its speed is |first step|, its sign the first
    # step's away from the walls
    speed = np.abs(step[:, 0])
    assert abs((speed == 0).mean() - 1 / 3) < 0.03
    inner = (pos[:, 0] > 0) & (pos[:, 0] < hi[:, 0])
    v = step[:, 0][inner]
    assert {-1, 0, 1} == set(np.unique(v).tolist())
    assert abs((v == 1).mean() - (v == -1).mean()) < 0.04
    still = (speed == 0).all(axis=-1)  # objects standing still (about 1 in 9)
    assert abs(still.mean() - 1 / 9) < 0.03
    # start positions: uniform integers over every valid corner
    start = pos[:, 0]
    assert (start == 0).any() and (start == hi[:, 0]).any()
    assert abs((start / hi[:, 0]).mean() - 0.5) < 0.03


def test_fold_int_is_an_integer_triangle_wave():
    from nem_study.data.sequences import fold_int

    t = np.arange(9)
    assert fold_int(2 + t, np.int64(3)).tolist() == [2, 3, 2, 1, 0, 1, 2, 3, 2]
    assert fold_int(1 - t, np.int64(3)).tolist() == [1, 0, 1, 2, 3, 2, 1, 0, 1]
    assert fold_int(0 + t, np.int64(1)).tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert fold_int(0 - t, np.int64(0)).tolist() == [0] * 9  # room 1: no movement possible
    assert fold_int(t, np.int64(5)).dtype == np.int64


def test_unit_motion_in_a_frame_with_room_for_one_position():
    """image_size 12: the 12-wide triangles fit in exactly one column."""
    s = spec("flying_shapes", image_size=12, train=100)
    images, _ = data.generate(s, "train")
    lay = data.layout(s, "train")
    assert (images.sum(axis=(-1, -2)) <= on_pixels(lay).sum(-1)[:, None]).all()
    ref_img, _, masks = reference(s, lay)  # asserts that no object leaves the frame
    assert np.array_equal(images, ref_img) and (masks.sum(axis=(-1, -2)) == on_pixels(lay)[:, None]).all()
    pos = np.stack([lay.top, lay.left], -1)
    hi = s.image_size - extents(lay)[:, None]
    assert (hi == 0).any()
    _unit_motion_checks(pos, hi)
    assert (lay.left[np.broadcast_to(lay.ids[:, None] > 0, lay.left.shape)] == 0).all()


@needs_mnist
def test_flying_mnist_moves_by_unit_steps(mnist):
    s = spec("flying_mnist", train=200, digit_pool=20)
    lay = data.layout(s, "train", mnist=mnist)
    pos = np.stack([lay.top, lay.left], -1)
    _unit_motion_checks(pos, np.full((200, 1, 2, 2), s.image_size - s.digit_size))
    cont = data.layout(spec("flying_mnist", train=200, digit_pool=20, motion="continuous"), "train", mnist=mnist)
    assert np.abs(np.diff(cont.top, axis=1)).max() > 1  # the other motion is still there


def test_static_shapes_three_shapes_one_frame():
    s = spec("static_shapes", train=300)
    assert s.frames == 1 and s.objects == 3 and s.image_size == 28
    images, labels = data.generate(s, "train")
    assert images.shape == labels.shape == (300, 1, 28, 28)
    lay = data.layout(s, "train")
    assert lay.ids.shape == (300, 3) and set(np.unique(lay.ids)) == {0, 1, 2}
    visible = [set(np.unique(lab)) - {0, 255} for lab in labels]
    assert sum(v == {1, 2, 3} for v in visible) > 250  # nearly always all three visible
    # positions cover the full range of corners (uniform over the frame)
    room = s.image_size - extents(lay)[..., 0]
    assert (lay.top[:, 0] == 0).any() and (lay.top[:, 0] == room).any()


def test_frame_too_small_for_sprites_is_an_input_error():
    with pytest.raises(InputError, match="image_size"):
        data.generate(spec("flying_shapes", image_size=10), "train")


# ----------------------------------------------------------------------------------------
# Store


def test_store_round_trip_equals_generate(data_dir):
    s = spec("flying_shapes")
    d = data.ensure(s, progress=False)
    assert d.parent == data_dir and d.name.startswith("flying_shapes-")
    builds = store.builds
    assert data.ensure(s, progress=False) == d and store.builds == builds  # cached, not rebuilt
    for split in data.SPLITS:
        sp = data.load(s, split, progress=False)
        images, labels = data.generate(s, split)
        assert len(sp) == getattr(s, split) and sp.scale == 1.0 and sp.spec == s
        assert np.array_equal(np.concatenate(sp.images), images) and np.array_equal(np.concatenate(sp.labels), labels)
        assert all(not c.flags.writeable and not c.flags.owndata for c in sp.images)  # views of the map
    x, y = sp.batch([3, 0, 3])
    assert x.dtype == np.float32 and x.shape == (3, 21, 28, 28) and set(np.unique(x)) <= {0.0, 1.0}
    assert np.array_equal(x[0], images[3]) and np.array_equal(y[1], labels[0])


def test_store_batches_index_across_record_batches(data_dir):
    s = spec("static_shapes", train=2500)
    sp = data.load(s, "train", progress=False)
    images, labels = data.generate(s, "train")
    assert [len(c) for c in sp.images] == [1000, 1000, 500]  # one record batch per generated block
    idx = [999, 1000, 2499, 0, 1000]
    x, y = sp.batch(idx)
    assert np.array_equal(x, images[idx]) and np.array_equal(y, labels[idx])
    with pytest.raises(IndexError):
        sp.batch([2500])


def test_manifest_contents(data_dir):
    s = spec("flying_shapes", seed=3)
    d = data.ensure(s, progress=False)
    m = json.loads((d / "manifest.json").read_text())
    assert m["format_version"] == store.FORMAT_VERSION and m["spec"] == s.model_dump(mode="json")
    assert d.name == f"flying_shapes-{m['hash']}" and len(m["hash"]) == 12
    assert m["shape"] == [21, 28, 28] and m["scale"] == 1.0 and m["mnist"] is None
    for split in data.SPLITS:
        e = m["splits"][split]
        assert e["count"] == getattr(s, split) and e["file"] == f"{split}.arrow"
        assert e["sha256"] == store._sha256(d / e["file"]) and e["bytes"] == (d / e["file"]).stat().st_size
    assert {"package_version", "numpy_version", "pyarrow_version", "created", "generation_seconds"} <= set(m)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "test.arrow", "train.arrow", "valid.arrow"]
    assert data.set_dir(spec("flying_shapes", seed=4)) != d  # every spec has its own directory


def test_corrupt_file_is_an_input_error_naming_it(data_dir):
    s = spec("static_shapes")
    d = data.ensure(s, progress=False)
    f = d / "valid.arrow"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="valid.arrow") as e:
        data.load(s, "valid", progress=False)
    assert "sha256" in str(e.value) and str(d) in str(e.value) and "--force" in str(e.value)
    data.load(s, "train", progress=False)  # the other files are fine
    data.ensure(s, progress=False, force=True)  # regenerate
    assert np.array_equal(np.concatenate(data.load(s, "valid", progress=False).images), data.generate(s, "valid")[0])


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_bad_manifest_is_an_input_error(data_dir, damage):
    s = spec("static_shapes")
    d = data.ensure(s, progress=False)
    if damage == "missing":
        (d / "manifest.json").unlink()
    else:
        (d / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest.json"):
        data.load(s, "train", progress=False)


def _ensure_in_child(data_dir: str, spec_json: str, barrier, queue) -> None:
    import os

    os.environ["NEM_DATA_DIR"] = data_dir
    from nem_study import data as d
    from nem_study.config import DataConfig as C
    from nem_study.data import store as st

    s = C.model_validate_json(spec_json)
    barrier.wait()
    path = d.ensure(s, progress=False)
    queue.put((str(path), st.builds))


def test_two_processes_generate_once(data_dir):
    s = spec("flying_shapes", train=2000)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(data_dir), s.model_dump_json(), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][0] == results[1][0] == str(data.set_dir(s))
    assert sum(r[1] for r in results) == 1  # generated by exactly one of them
    assert [p.name for p in data_dir.iterdir() if not p.name.endswith(".lock")] == [Path(results[0][0]).name]
    sp = data.load(s, "train", progress=False)  # verifies every sha256
    assert np.array_equal(np.concatenate(sp.images), data.generate(s, "train")[0])  # same bytes in another process


# ----------------------------------------------------------------------------------------
# MNIST


def _downsample_2x2(x: np.ndarray) -> np.ndarray:
    """Independent reference: the mean of each 2x2 block, rounded half up."""
    total = x.astype(np.int64).reshape(len(x), 14, 2, 14, 2).sum(axis=(2, 4))
    return ((total * 2 + 4) // 8).astype(np.uint8)  # floor(total / 4 + 1/2)


@needs_mnist
@pytest.mark.parametrize("overlap", ["max", "clip_sum"])
def test_flying_mnist_curriculum_and_labels(mnist, overlap):
    s = spec("flying_mnist", train=16, digit_pool=20, overlap=overlap)
    assert (s.image_size, s.objects, s.digit_size) == (24, 2, 14)
    images, labels = data.generate(s, "train", mnist=mnist)
    lay = data.layout(s, "train", mnist=mnist)
    assert lay.pool.shape == (20, 14, 14) and lay.ids.max() < 20  # the curriculum pool
    assert np.array_equal(lay.pool, _downsample_2x2(mnist.x_train[:20]))
    ref_img, ref_lab, masks = reference(s, lay)
    assert np.array_equal(images, ref_img) and np.array_equal(labels, ref_lab)
    assert np.array_equal(images > 0, labels != data.BACKGROUND)  # ink > 0 <=> labelled
    assert np.array_equal(labels == data.OVERLAP, masks.sum(2) >= 2) and (labels == data.OVERLAP).any()
    assert images.max() > 200  # grey-scale 0..255
    valid = data.layout(s, "valid", n=4, mnist=mnist)
    assert len(valid.pool) == 10_000 and np.array_equal(valid.pool[:5], _downsample_2x2(mnist.x_valid[:5]))


@needs_mnist
def test_flying_mnist_store_from_npz_path(data_dir):
    s = spec("flying_mnist", train=8, valid=3, test=3, digit_pool=500)
    sp = data.load(s, "train", mnist_path=NPZ, progress=False)
    assert sp.scale == pytest.approx(1 / 255) and sp.images[0].shape == (8, 21, 24, 24)
    x, _ = sp.batch([0, 1])
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.7
    assert np.array_equal(np.concatenate(sp.images), data.generate(s, "train", mnist=NPZ)[0])
    m = data.read_manifest(data.set_dir(s))
    assert m["mnist"]["source"] == str(NPZ) and set(m["mnist"]["sha256"]) == {"train", "valid", "test"}


def _write_idx(path: Path, x: np.ndarray) -> None:
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, *x.shape))
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:  # type: ignore[operator]
        f.write(header + np.ascontiguousarray(x).tobytes())


@needs_mnist
def test_mnist_from_an_idx_directory(tmp_path, mnist, monkeypatch):
    d = tmp_path / "idx"
    d.mkdir()
    _write_idx(d / "train-images-idx3-ubyte", np.concatenate([mnist.x_train, mnist.x_valid]))
    _write_idx(d / "t10k-images-idx3-ubyte.gz", mnist.x_test)
    monkeypatch.setenv("NEM_MNIST", str(d))  # the environment variable is a source too
    m = data.load_mnist()
    assert np.array_equal(m.x_train, mnist.x_train) and np.array_equal(m.x_valid, mnist.x_valid)
    assert np.array_equal(m.x_test, mnist.x_test) and m.source == str(d)


@needs_mnist
def test_mnist_downloads_from_the_first_mirror_that_answers_then_uses_the_cache(tmp_path, mnist, monkeypatch,
                                                                               data_dir):
    """A local HTTP server stands in for a mirror (these machines reach no real one)."""
    import functools
    import http.server
    import threading

    served = tmp_path / "mirror"
    served.mkdir()
    _write_idx(served / "train-images-idx3-ubyte.gz", np.concatenate([mnist.x_train, mnist.x_valid]))
    _write_idx(served / "t10k-images-idx3-ubyte.gz", mnist.x_test)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dead, alive = "http://127.0.0.1:9/", f"http://127.0.0.1:{server.server_port}/"
        monkeypatch.setattr(mnist_mod, "MIRRORS", [dead, alive])
        m = data.load_mnist()
    finally:
        server.shutdown()
        server.server_close()
    assert np.array_equal(m.x_train, mnist.x_train) and np.array_equal(m.x_test, mnist.x_test)
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == \
        ["t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"]   # no .part files left
    again = data.load_mnist()   # the server is gone: the cached copy
    assert again.source == str(data_dir / "mnist") and np.array_equal(again.x_valid, mnist.x_valid)


def test_missing_mnist_path_names_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(InputError, match="nowhere") as e:
        data.generate(spec("flying_mnist"), "train", n=2, mnist=missing)
    assert str(missing) in str(e.value) and "NEM_MNIST" in str(e.value)
    monkeypatch.setenv("NEM_MNIST", str(missing))
    with pytest.raises(InputError, match="from NEM_MNIST"):
        data.load_mnist()


def test_npz_without_the_arrays_names_what_is_missing(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(InputError, match="x_valid") as e:
        data.load_mnist(bad)
    assert str(bad) in str(e.value)


def test_no_mnist_anywhere_lists_what_was_tried(monkeypatch, data_dir):
    monkeypatch.setattr(mnist_mod, "MIRRORS", ["http://127.0.0.1:9/"])
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it raises ImportError
    with pytest.raises(InputError) as e:
        data.ensure(spec("flying_mnist"), progress=False)
    msg = str(e.value)
    for part in ("NEM_MNIST", "--mnist", str(data_dir / "mnist"), "127.0.0.1", "torchvision"):
        assert part in msg
    assert not any(p.name.startswith("flying_mnist") for p in data_dir.iterdir())  # nothing half-made


# ----------------------------------------------------------------------------------------
# Plot


def test_data_strip_writes_a_png(tmp_path):
    from nem_study.plots import data_strip, label_colours

    images, labels = data.generate(spec("flying_shapes", train=3), "train")
    out = data_strip(images, labels, tmp_path / "strip.png", n_seq=2, n_frames=4, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = label_colours(np.array([0, 1, 2, 255], np.uint8))
    assert (rgb[0] == 0).all() and (rgb[3] == 1).all() and not np.allclose(rgb[1], rgb[2])


@needs_mnist
def test_a_study_prepares_the_evaluation_data_of_a_curriculums_last_stage(data_dir):
    """The evaluations test the last stage's checkpoint, whose data spec names that stage's digit
    pool: `prepare_data` must make those test sets before any trial, while MNIST is at hand."""
    from nem_study.study_config import StudyConfig
    from nem_study.trials import expand_trials
    from nem_study.evaluate import test_spec
    from nem_study.study import prepare_data
    from nem_study.curriculum import curriculum_stages

    study = StudyConfig.model_validate({
        "name": "s", "base": {"data": {"name": "flying_mnist", "train": 4, "valid": 2, "test": 2,
                                       "curriculum": [5, 10]}},
        "evaluations": [{"objects": 3, "k": 3}, {"steps": 30}]})
    trials = expand_trials(study)
    prepare_data(study, trials, mnist_path=NPZ)
    last = curriculum_stages(trials[0].config)[-1]
    for ev in study.evaluations:
        assert data.set_dir(test_spec(last, ev.objects, ev.steps)).is_dir(), ev
