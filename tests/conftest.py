"""Shared fixtures: tiny in-memory data sets and a private data cache per test."""

from __future__ import annotations

import pytest
import torch

from nem_study import data
from nem_study.config import RunConfig

# Tests run on 2 cores beside other work; one thread avoids OpenMP oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEM_DATA_DIR", str(tmp_path / "nem_data"))
    monkeypatch.delenv("NEM_MNIST", raising=False)


def make_splits(cfg: RunConfig) -> dict[str, data.Split]:
    """Generate the three splits of ``cfg.data`` in memory (no cache)."""
    scale = 1.0 / 255 if cfg.data.grey else 1.0
    out = {}
    for split in data.SPLITS:
        images, labels = data.generate(cfg.data, split)
        out[split] = data.Split(images, labels, scale, cfg.data, split)
    return out
