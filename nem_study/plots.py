"""Figures shared by the CLI, training artifacts and the analysis (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# label colours: 0 background black, objects 1..9 distinct colours, 255 (overlap) white
_OBJECT_COLOURS = np.array([
    (0.894, 0.102, 0.110), (0.216, 0.494, 0.722), (0.302, 0.686, 0.290), (1.000, 0.498, 0.000),
    (0.596, 0.306, 0.639), (1.000, 1.000, 0.200), (0.651, 0.337, 0.157), (0.969, 0.506, 0.749),
    (0.400, 0.761, 0.647),
])


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (slow import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, title: str | None = None, rect=(0, 0, 1, 1)) -> Path:
    """Title, tight layout, write the PNG (folders made as needed), close; the path written."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=rect)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def label_colours(labels: np.ndarray) -> np.ndarray:
    """uint8 label maps (..., H, W) -> RGB float (..., H, W, 3): background black, objects
    coloured (cycling after 9), overlap (255) white."""
    lut = np.zeros((256, 3))
    for v in range(1, 255):
        lut[v] = _OBJECT_COLOURS[(v - 1) % len(_OBJECT_COLOURS)]
    lut[255] = 1.0
    return lut[np.asarray(labels, dtype=np.uint8)]


def data_strip(images, labels, path, n_seq: int = 4, n_frames: int = 8, title: str | None = None) -> Path:
    """A PNG of a few sequences: per sequence a row of frames and below it their label maps.

    images: (N, T, H, W) (or (N, H, W) for static data), uint8 0/1, uint8 0..255 or float in
    [0, 1]; labels: uint8, same shape. Shows ``n_frames`` frames evenly spaced over the
    sequence (all of them if it is shorter). Returns the path written.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images, labels = images[:, None], labels[:, None]
    if images.ndim != 4 or images.shape != labels.shape:
        raise ValueError(f"images and labels must both be (N, T, H, W); got {images.shape} and {labels.shape}")
    n_seq = max(1, min(n_seq, images.shape[0]))
    t = images.shape[1]
    frames = np.unique(np.linspace(0, t - 1, min(n_frames, t)).round().astype(int))
    vmax = 255 if images.dtype == np.uint8 and images.max(initial=0) > 1 else 1

    cols = len(frames)
    fig, axes = plt.subplots(2 * n_seq, cols, figsize=(1.2 * cols + 0.4, 2.5 * n_seq + 0.6),
                             squeeze=False)
    for s in range(n_seq):
        for c, f in enumerate(frames):
            ax_img, ax_lab = axes[2 * s, c], axes[2 * s + 1, c]
            ax_img.imshow(images[s, f], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            ax_lab.imshow(label_colours(labels[s, f]), interpolation="nearest")
            for ax in (ax_img, ax_lab):
                ax.set_xticks([])
                ax.set_yticks([])
            if s == 0:
                ax_img.set_title(f"t = {f}", fontsize=8)
        axes[2 * s, 0].set_ylabel(f"seq {s}", fontsize=8)
        axes[2 * s + 1, 0].set_ylabel("labels", fontsize=8)
    k = int(labels[(labels != 0) & (labels != 255)].max(initial=0))
    handles = [Patch(color=_OBJECT_COLOURS[(v - 1) % len(_OBJECT_COLOURS)], label=f"object {v}")
               for v in range(1, k + 1)]
    handles.append(Patch(facecolor="white", edgecolor="grey", label="overlap"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    return _save(fig, path, title, rect=(0, 0.04, 1, 0.97 if title else 1))


def training_curves(history: list[dict], path, title: str | None = None) -> Path:
    """A PNG of one run's epochs: train / valid loss (left) and AMI (right).

    ``history`` is the trainer's list of per-epoch metrics; AMI curves are drawn for the keys
    present (``valid_ami``, ``test_ami``).
    """
    plt = _pyplot()

    epochs = [h.get("iteration", h["epoch"]) for h in history]  # counted over curriculum stages
    fig, (ax_loss, ax_ami) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key in ("train_loss", "valid_loss"):
        ax_loss.plot(epochs, [h[key] for h in history], marker="o", ms=3, label=key.replace("_", " "))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (sum over steps, pixels, K)")
    ax_loss.legend(fontsize=8)
    for key in ("valid_ami", "test_ami"):
        if all(key in h for h in history):
            ax_ami.plot(epochs, [h[key] for h in history], marker="o", ms=3, label=key.replace("_", " "))
    ax_ami.set_xlabel("epoch")
    ax_ami.set_ylabel("AMI (static: last step; else mean over steps)")
    ax_ami.set_ylim(bottom=min(0.0, ax_ami.get_ylim()[0]))
    ax_ami.grid(alpha=0.3)
    ax_ami.legend(fontsize=8)
    return _save(fig, path, title)


def grouping_panel(frames, psi, gamma, labels, path, seq: int = 0, n_steps: int = 10,
                   title: str | None = None) -> Path:
    """Figure-4-style panel of one sequence: the input frames, each component's prediction
    psi_k, the soft assignment gamma (component colours mixed by gamma) and the true labels.

    frames: (T, H, W) the input at each step; psi, gamma: (T, K, H, W); labels: (T, H, W) of
    each step's target. Shows ``n_steps`` steps evenly spaced over T. The tiles go into one
    image drawn by one ``imshow``: every trial draws this panel, and a grid of subplots cost
    1-2 s of the trial's time (BENCHMARKS.md).
    """
    plt = _pyplot()

    frames, psi, gamma, labels = (np.asarray(a) for a in (frames, psi, gamma, labels))
    T, K, H, W = psi.shape
    steps = np.unique(np.linspace(0, T - 1, min(n_steps, T)).round().astype(int))
    colours = _OBJECT_COLOURS[np.arange(K) % len(_OBJECT_COLOURS)]          # (K, 3)
    grey = lambda a: np.repeat(a[..., None], 3, axis=-1).clip(0, 1)        # (..., H, W, 3)
    rows = [("input", grey(frames[steps]))]                                 # each (S, H, W, 3)
    rows += [(f"psi {k + 1}", grey(psi[steps, k])) for k in range(K)]
    rows += [("gamma", np.einsum("tkhw,kc->thwc", gamma[steps], colours).clip(0, 1)),
             ("truth", label_colours(labels[steps]))]
    gap = max(1, H // 12)
    mosaic = np.full((len(rows) * (H + gap) - gap, len(steps) * (W + gap) - gap, 3), 0.8)  # grey gaps
    for r, (_, tiles) in enumerate(rows):
        for c, tile in enumerate(tiles):
            mosaic[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = tile
    fig, ax = plt.subplots(figsize=(1.1 * len(steps) + 0.6, 1.15 * len(rows) + 0.4))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks(np.arange(len(steps)) * (W + gap) + (W - 1) / 2, [f"t = {t + 1}" for t in steps], fontsize=8)
    ax.set_yticks(np.arange(len(rows)) * (H + gap) + (H - 1) / 2, [name for name, _ in rows], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return _save(fig, path, title)
