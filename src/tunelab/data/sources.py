"""Read raw records from a local file or a `datasets` name into named splits of plain dicts."""

from __future__ import annotations

import io
import json
import math
import random
import re
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.paths import DATA_DIR

Records = list[dict]


class SourceRecord(dict):
    """A raw record that knows where it came from ("data.jsonl:8"), so a data error names the file's line, not
    the record's position after the split's shuffle; in every other way (content, hashes, JSON) a plain dict."""

    __slots__ = ("where",)

    def __init__(self, fields: dict, where: str):
        super().__init__(fields)
        self.where = where


def keep_origin(new: dict, old: dict) -> dict:
    """`new` (a record rebuilt from `old`, e.g. with renamed fields) still naming where `old` came from."""
    where = getattr(old, "where", None)
    return SourceRecord(new, where) if where else new


def record_name(record: dict, index: int, kind: str = "record") -> str:
    """How an error names a record: 'preference record at data.jsonl:8' where it came from a file, else
    'preference record 31' (its position in the split)."""
    where = getattr(record, "where", None)
    return f"{kind} at {where}" if where else f"{kind} {index}"
SPLIT_ALIASES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def resolve_source(source: str) -> Path | str:
    """`tunelab:NAME` is a file shipped with the package; paths must exist; anything else is a datasets name."""
    source = str(source)
    if source.startswith("tunelab:"):
        path = DATA_DIR / source.removeprefix("tunelab:")
        if not path.is_file():
            shipped = ", ".join(sorted(p.name for p in DATA_DIR.glob("*.jsonl")))
            raise TunelabError(f"no shipped dataset '{source}'; shipped: {shipped}")
        return path
    path = Path(source).expanduser()
    if path.exists() or path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise TunelabError(f"data file {path} does not exist; set data.source=PATH to a JSONL/JSON/CSV/Parquet file")
        return path
    return source


def load_splits(source: str, subset: str | None = None, encoding: str = "utf-8") -> dict[str, Records]:
    """{'train': [...], optionally 'val' and 'test'} from a file (one split) or a datasets name (its splits)."""
    resolved = resolve_source(source)
    if isinstance(resolved, Path):
        return {"train": read_file(resolved, encoding)}
    return read_hub_dataset(resolved, subset)


def check_local_file(source: str, encoding: str = "utf-8") -> None:
    """Read a local source once before anything slow starts, so a missing, undecodable or malformed file
    is refused in seconds (a datasets name is left to the hub check and the loader)."""
    resolved = resolve_source(source)
    if isinstance(resolved, Path):
        read_file(resolved, encoding)


def read_file(path: Path, encoding: str = "utf-8") -> Records:
    readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_table, ".parquet": read_table, ".txt": read_text}
    if path.suffix not in readers:
        raise TunelabError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(readers)}")
    records = readers[path.suffix](path, encoding)
    if path.suffix != ".jsonl":  # JSON Lines records carry their line; the others their position in the file
        unit = {".txt": "paragraph", ".json": "record"}.get(path.suffix, "row")
        records = [SourceRecord(r, f"{path}, {unit} {i}") for i, r in enumerate(records, start=1)]
    if not records:
        raise TunelabError(f"{path} holds no records; add examples or point data.source at another file")
    return records


def decoded(path: Path, encoding: str) -> str:
    """The file's text; a byte the encoding cannot decode is one error naming the file, line and column."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        column = len(raw[line_start : err.start].decode(encoding, errors="replace")) + 1
        raise TunelabError(
            f"{path}:{line}: byte 0x{raw[err.start]:02x} at column {column} is not valid {encoding}; set "
            "data.encoding to the file's encoding (e.g. data.encoding=latin-1 or cp1252) or save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark (Windows editors write one) is no part of the data


def read_jsonl(path: Path, encoding: str = "utf-8") -> Records:
    records = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at.
    for lineno, line in enumerate(decoded(path, encoding).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TunelabError(f"{path}:{lineno}: {malformed(err, line)}; fix or remove that line") from None
        if not isinstance(record, dict):
            raise TunelabError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
        records.append(SourceRecord(record, f"{path}:{lineno}"))
    return records


def malformed(err: json.JSONDecodeError, line: str) -> str:
    message = f"malformed JSON ({err.msg} at column {err.colno})"
    if err.pos >= len(line.rstrip()):  # the line ended inside a record: one spread over several lines
        message += ", the line ends inside a record (JSON Lines needs each record on one line)"
    return message


def read_json(path: Path, encoding: str = "utf-8") -> Records:
    try:
        data = json.loads(decoded(path, encoding))
    except json.JSONDecodeError as err:
        hint = "; one record per line is JSON Lines: name the file .jsonl" if err.msg == "Extra data" else ""
        raise TunelabError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}){hint}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the one list it holds
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise TunelabError(f"{path}: expected a list of records or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise TunelabError(f"{path}: expected a JSON list of objects")
    return data


def read_table(path: Path, encoding: str = "utf-8") -> Records:
    import pandas as pd

    try:  # CSV text goes through decoded() so an undecodable byte is reported like in every other format
        frame = (pd.read_csv(io.StringIO(decoded(path, encoding)), keep_default_na=False) if path.suffix == ".csv"
                 else pd.read_parquet(path))
    except TunelabError:
        raise
    except Exception as err:  # pandas raises many types; all mean the same to the user
        raise TunelabError(f"{path}: cannot read as {path.suffix[1:].upper()} ({err})") from None
    return frame.to_dict(orient="records")


def read_text(path: Path, encoding: str = "utf-8") -> Records:
    """Plain text: one document per blank-line-separated paragraph."""
    paragraphs = decoded(path, encoding).split("\n\n")
    return [{"text": p.strip()} for p in paragraphs if p.strip()]


def read_hub_dataset(name: str, subset: str | None) -> dict[str, Records]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, subset)
    except Exception as err:  # offline, unknown name, bad subset: all one message
        raise TunelabError(
            f"cannot load dataset '{name}' ({str(err).strip().splitlines()[0][:200]}); "
            "offline machines need a local file: data.source=PATH"
        ) from None
    splits = {}
    for split_name, split in loaded.items():
        key = SPLIT_ALIASES.get(split_name)
        if key and key not in splits:
            splits[key] = split.to_list()
    if "train" not in splits:
        raise TunelabError(f"dataset '{name}' has no train split (splits: {', '.join(loaded)})")
    return splits


def field_text(value) -> str:
    """A record field as text: a string as is, chat turns as their contents joined by newlines."""
    if isinstance(value, list):
        return "\n".join(str(turn.get("content", "")) if isinstance(turn, dict) else str(turn) for turn in value)
    return "" if value is None else str(value)


def keep_matching(splits: dict[str, Records], patterns: dict[str, str] | None) -> dict[str, Records]:
    """Only the records whose every named field matches its regular expression (re.search), in every split:
    `data.filter={prompt: 'capital|opposite'}` keeps the records whose prompt names a capital or an opposite."""
    if not patterns:
        return splits
    compiled = {}
    for field, pattern in patterns.items():
        try:
            compiled[field] = re.compile(str(pattern))
        except re.error as err:
            raise TunelabError(f"data.filter.{field}={pattern!r} is not a valid regular expression ({err})") from None
    first = next((records[0] for records in splits.values() if records), {})
    missing = [field for field in compiled if field not in first]
    if missing:
        raise TunelabError(f"data.filter names field(s) {', '.join(missing)} that the records do not have; "
                           f"they have {', '.join(first) or 'no fields'}")
    kept = {name: [r for r in records if all(rx.search(field_text(r.get(f))) for f, rx in compiled.items())]
            for name, records in splits.items()}
    if not kept.get("train"):
        total = sum(len(records) for records in splits.values())
        raise TunelabError(f"data.filter={dict(patterns)} keeps no training record of {total}; loosen the patterns")
    return kept


def split_records(splits: dict[str, Records], val_size: float, test_size: float, seed: int) -> dict[str, Records]:
    """Carve the missing val/test splits out of train, deterministically from the seed."""
    train = list(splits["train"])
    missing = [name for name, size in (("val", val_size), ("test", test_size)) if name not in splits and size]
    if not missing:
        return {"val": [], "test": [], **splits}
    random.Random(seed).shuffle(train)
    result, total = dict(splits), len(train)
    for name in missing:
        size = val_size if name == "val" else test_size
        count = math.ceil(size * total) if size < 1 else int(size)  # fractions of the whole source
        if count >= len(train):
            raise TunelabError(
                f"data.{name}_size={size} leaves no training examples out of {len(splits['train'])}; make it smaller"
            )
        result[name], train = train[:count], train[count:]
    result["train"] = train
    result.setdefault("val", [])
    result.setdefault("test", [])
    return result
