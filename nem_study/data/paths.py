"""Where the data live: the cache folder, ``$NEM_DATA_DIR`` or the user's cache (``platformdirs``).

Generated data sets (``store.py``) and downloaded MNIST (``mnist.py``) both go below it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "NEM_DATA_DIR"


def data_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nem-study")) / "data"
