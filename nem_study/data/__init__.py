"""Data sets of NEM_SPEC.md §4: static shapes, flying shapes, flying MNIST.

A data set is a pure function of its :class:`~nem_study.config.DataConfig` spec (and, for
flying MNIST, of the MNIST digits). Public API:

* :func:`generate` -- images and labels of a split as in-memory uint8 arrays (N, T, H, W);
* :func:`ensure` -- generate all three splits into the Arrow cache unless there; its directory;
* :func:`load` -- ensure, then a memory-mapped :class:`Split` (``.batch``; ``.images``, ``.labels`` in chunks).

Label maps: :data:`BACKGROUND` (0), 1..K for the object covering a pixel, :data:`OVERLAP` (255)
where two or more objects cover it. Files: ``shapes.py`` (sprites, static shapes),
``sequences.py`` (motion, compositing), ``mnist.py`` (MNIST sources, curriculum pools),
``synth.py`` (seeding, blocks, dispatch), ``store.py`` (the cache).
"""

from nem_study.data.synth import SPLITS, Layout, generate, iter_blocks, layout
from nem_study.data.mnist import Mnist, load_mnist
from nem_study.data.shapes import BACKGROUND, OVERLAP, SPRITES
from nem_study.data.store import Split, data_dir, ensure, load, read_manifest, set_dir

__all__ = [
    "BACKGROUND", "OVERLAP", "SPLITS", "SPRITES", "Layout", "Mnist", "Split", "data_dir", "ensure",
    "generate", "iter_blocks", "layout", "load", "load_mnist", "read_manifest", "set_dir",
]
