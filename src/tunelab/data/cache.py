"""A content-addressed cache of tokenised splits.

The key is the raw records' content, the tokenizer, the template and the preprocessing settings
(with the source of the code that applies them), and nothing else: a new run dir, learning rate or batch size reuses the entry; another template,
tokenizer, max_length or label rule misses it."""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import sys
import tempfile
from pathlib import Path

from tunelab.data import formats, templates, tokenize
from tunelab.data.fingerprints import digest, records_fingerprint, template_fingerprint, tokenizer_fingerprint
from tunelab.paths import cache_dir

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the cached rows change shape


def preprocessing_settings(datamodule) -> dict:
    """Every DataModule setting that changes the tokens (batching and loader settings do not)."""
    tokenization = datamodule.tokenization
    return {
        "format": datamodule.format,
        "fields": dict(sorted(datamodule.fields.items())),
        "system_prompt": datamodule.system_prompt,
        "max_length": datamodule.max_length,
        "tokenization": [type(tokenization).__module__, type(tokenization).__qualname__, vars(tokenization)],
    }


def preprocessing_code(datamodule) -> str:
    """The source of the modules that turn records into tokens, so editing them never serves stale tokens."""
    modules = {formats, templates, tokenize, sys.modules[type(datamodule.tokenization).__module__]}
    return digest(sorted(inspect.getsource(module) for module in modules))


def data_fingerprints(datamodule, splits: dict[str, list[dict]]) -> dict[str, str]:
    """The hashes the cache key is made of (also recorded in the run's provenance manifest)."""
    tokenizer = datamodule.tokenizer
    parts = {"records": records_fingerprint(splits), "tokenizer": tokenizer_fingerprint(tokenizer),
             "template": template_fingerprint(tokenizer, datamodule.formatter.template),
             "preprocessing": digest(preprocessing_settings(datamodule), preprocessing_code(datamodule))}
    return {**parts, "cache_key": digest(FORMAT_VERSION, parts)}


def cache_key(datamodule, splits: dict[str, list[dict]]) -> str:
    return data_fingerprints(datamodule, splits)["cache_key"]


class TokenCache:
    """One entry per key: {split: (examples, rows)}, pickled under TUNELAB_CACHE/data/."""

    def __init__(self, key: str, folder: Path | None = None):
        self.key = key
        self.path = (folder or cache_dir() / "data") / f"{key}.pkl"

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            with self.path.open("rb") as handle:
                return pickle.load(handle)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:  # a damaged entry is a miss
            log.warning("ignoring unreadable data cache entry %s (%s)", self.path, err)
            return None

    def save(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the entry and rename: concurrent runs (DDP ranks) never read half a file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(entry, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.path)
