"""Where tunelab keeps its configs, shipped data and caches."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent.parent
CONF_DIR = Path(os.environ.get("TUNELAB_CONF_DIR", REPO_DIR / "conf"))
DATA_DIR = PACKAGE_DIR / "resources" / "data"


def cache_dir() -> Path:
    """Converted models and other derived files; TUNELAB_CACHE moves it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunelab"
    path = Path(os.environ.get("TUNELAB_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path
