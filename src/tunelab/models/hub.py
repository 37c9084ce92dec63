"""Hub names while offline: decided in seconds, before the libraries spend 35-57 s retrying.

A model or dataset name that is no local path is a Hugging Face hub id. Before anything loads one, one
request with a short timeout asks whether the hub answers. If it does not, the libraries are switched
to offline mode (a copy in the local cache still loads), and a name with no cached copy is refused.
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path

from tunelab.errors import TunelabError

DEFAULT_ENDPOINT = "https://huggingface.co"
# A hub that answers does so well within this; the libraries' own retries take 35-57 s to give up.
REACHABLE_TIMEOUT_S = 3.0
SERVER_ERROR = 500
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_WORDS = ("1", "true", "yes", "on")


def looks_like_path(name: str) -> bool:
    """A name meant as a local path: ./x, /x, ~/x, or a/b/c (a hub id has at most one slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def is_model_id(name: str) -> bool:
    """What tunelab.models.loading.resolve_model_path hands to the hub."""
    from tunelab.models.embedded import is_embedded

    return not (is_embedded(name) or Path(name).expanduser().exists() or looks_like_path(name))


def is_dataset_name(name: str) -> bool:
    """What tunelab.data.sources.load_splits hands to `datasets` (a missing local-looking file is refused there)."""
    from tunelab.data.sources import resolve_source

    return isinstance(resolve_source(name), str)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def answers(url: str, timeout: float = REACHABLE_TIMEOUT_S) -> bool:
    """Whether anything at `url` answers within `timeout` (a status below 500). In a thread, because
    the socket timeout does not bound the name lookup, which is what hangs on some offline machines."""
    outcome = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(True)
        except urllib.error.HTTPError as err:  # 4xx is still the hub answering; 5xx is it (or a proxy) failing
            outcome.append(err.code < SERVER_ERROR)
        except Exception:  # refused, unresolvable, timed out
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome) and outcome[0]


@cache
def unreachable_because() -> str | None:
    """None when the hub answers; otherwise why it counts as unreachable (asked once per process)."""
    chosen = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").strip().lower() in TRUE_WORDS]
    if chosen:
        return f"{chosen[0]} is set"
    if answers(endpoint()):
        return None
    return f"{endpoint()} did not answer within {REACHABLE_TIMEOUT_S:g} s"


def go_offline() -> None:
    """Offline mode for transformers, datasets and huggingface_hub. They read these variables when imported,
    and Lightning has imported huggingface_hub already, so its module constant is set as well."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def cached(name: str, kind: str) -> bool:
    """Whether the hub cache (or, for a dataset, datasets' own cache) holds a copy to load offline."""
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"{kind}s--{name.replace('/', '--')}" / "snapshots").is_dir():
        return True
    if kind != "dataset":
        return False
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return (datasets_cache / name.replace("/", "___")).is_dir()


HUB_NAMES = (("model.name_or_path", "model", is_model_id), ("data.source", "dataset", is_dataset_name))


def check_hub_names(cfg) -> None:
    """Every config value that may name a hub model or dataset."""
    from omegaconf import OmegaConf

    for key, kind, is_hub_id in HUB_NAMES:
        name = OmegaConf.select(cfg, key, default=None)
        if name and is_hub_id(str(name)):
            check_hub_name(key, str(name), kind)


def check_hub_name(key: str, name: str, kind: str) -> None:
    """Refuse `key=name` (a hub id of a model or dataset) when the hub is unreachable and nothing is cached."""
    why = unreachable_because()
    if why is None:
        return
    go_offline()
    if cached(name, kind):
        return
    local = "folder" if kind == "model" else "file"
    raise TunelabError(f"{key}={name} looks like a Hugging Face hub {kind} id, but the hub is unreachable ({why}) "
                       f"and no copy is cached; give a local {local}: {key}=PATH")
