"""results/data_vs_authors.png: the authors' flying-shapes frames beside ours (RESULTS.md).

The authors' README figure (``illustrations/flying_shapes.png`` of sjoerdvansteenkiste/Neural-EM)
shows its input frames, 28 x 28 at about 9.96 screen pixels per pixel, in its bottom row; each
cell is read back by sampling pixel centres. Ours: the default flying-shapes data with 5 objects,
training sequence 0, the frames `nem-study data show flying_shapes --set objects=5` draws.

    .venv/bin/python results/data_vs_authors.py PATH/TO/authors_flying_shapes.png
"""

import sys

import matplotlib
import numpy as np
from PIL import Image

from nem_study import data
from nem_study.config import DataConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FRAMES = 10
figure = np.asarray(Image.open(sys.argv[1]).convert("L"))
centres = ((np.arange(28) + 0.5) * 279 / 28).astype(int)                   # 28 pixel centres of a cell
authors = [figure[1835 + centres][:, 39 + round(311.45 * t) + centres] > 127 for t in range(FRAMES)]
ours = data.generate(DataConfig(name="flying_shapes", objects=5), "train", n=1)[0][0, :FRAMES]

fig, ax = plt.subplots(2, FRAMES, figsize=(12, 3.0), dpi=100)
for t in range(FRAMES):
    for row, frame in enumerate((authors[t], ours[t])):
        ax[row, t].imshow(frame, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax[row, t].set_xticks([])
        ax[row, t].set_yticks([])
    ax[0, t].set_title(f"frame {t}", fontsize=8)
ax[0, 0].set_ylabel("authors", fontsize=8)
ax[1, 0].set_ylabel("ours", fontsize=8)
fig.suptitle("flying shapes, 5 objects, 28x28: authors' README figure (input row, steps 1-10) vs our default "
             "data (binding sprites, unit motion; train seq 0)", fontsize=8)
fig.subplots_adjust(left=0.03, right=0.995, bottom=0.02, top=0.82, wspace=0.08, hspace=0.25)
fig.savefig("results/data_vs_authors.png")
