"""The dataset formats users already have, normalised to one of two shapes.

Accepted (TRL's names where TRL has them):
- alpaca:            instruction, optional input, output
- prompt_completion: prompt, completion (strings, or message lists as in TRL's conversational form)
- messages:          messages = [{role, content}, ...]
- text:              text (raw documents for continued pretraining)
A `fields` mapping renames the user's columns first, e.g. {prompt: question, completion: answer}.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.sources import keep_origin, record_name
from tunelab.errors import TunelabError

REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
DETECTION_ORDER = ("messages", "prompt_completion", "alpaca", "text")


@dataclass(frozen=True)
class Conversation:
    """Chat messages; assistant turns are what supervised methods learn to produce."""

    messages: tuple[dict, ...]

    @property
    def prompt(self) -> list[dict]:
        """Every message before the final assistant turn: what a model sees at evaluation."""
        return list(self.messages[:-1]) if self.messages[-1]["role"] == "assistant" else list(self.messages)

    @property
    def reference(self) -> str | None:
        last = self.messages[-1]
        return last["content"] if last["role"] == "assistant" else None


@dataclass(frozen=True)
class Document:
    """Raw text; every token is supervised."""

    text: str


Example = Conversation | Document


def rename_fields(record: dict, fields: dict[str, str] | None) -> dict:
    if not fields:
        return record
    renamed = dict(record)
    for canonical, column in fields.items():
        if column in record:
            renamed[canonical] = record[column]
    return keep_origin(renamed, record)


def detect_format(record: dict) -> str:
    for name in DETECTION_ORDER:
        if all(key in record for key in REQUIRED[name]):
            return name
    expected = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in REQUIRED.items())
    raise TunelabError(
        f"records have fields [{', '.join(map(str, record))}], none of the known formats ({expected}); "
        "map your columns with data.fields, e.g. data.fields={prompt:question,completion:answer}"
    )


def check_fields(record: dict, fmt: str, index: int = 0) -> None:
    missing = [key for key in REQUIRED[fmt] if key not in record]
    if missing:
        raise TunelabError(
            f"{record_name(record, index)}: format '{fmt}' needs fields [{', '.join(missing)}] missing from the data; the records have "
            f"[{', '.join(map(str, record))}]; map them with data.fields, e.g. data.fields={{{missing[0]}:COLUMN}}"
        )


def to_example(record: dict, fmt: str, system_prompt: str | None = None) -> Example:
    if fmt == "text":
        return Document(str(record["text"]))
    if fmt == "messages":
        messages = [{"role": m["role"], "content": str(m["content"])} for m in record["messages"]]
    elif fmt == "prompt_completion":
        messages = as_messages(record["prompt"], "user") + as_messages(record["completion"], "assistant")
    else:  # alpaca
        instruction, extra = str(record["instruction"]), str(record.get("input") or "").strip()
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(record["output"])}]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Conversation(tuple(messages))


def as_messages(value, role: str) -> list[dict]:
    if isinstance(value, list):  # TRL's conversational prompt/completion
        return [{"role": m["role"], "content": str(m["content"])} for m in value]
    return [{"role": role, "content": str(value)}]


def normalize(records: list[dict], fmt: str = "auto", fields: dict | None = None, system_prompt=None) -> list[Example]:
    """Records in any accepted format -> Conversations or Documents (one format per dataset)."""
    if not records:
        return []
    renamed = [rename_fields(r, fields) for r in records]
    fmt = detect_format(renamed[0]) if fmt == "auto" else fmt
    if fmt not in REQUIRED:
        raise TunelabError(f"unknown data.format '{fmt}'; use auto, {', '.join(REQUIRED)}")
    for index, record in enumerate(renamed):
        check_fields(record, fmt, index)
    return [to_example(r, fmt, system_prompt) for r in renamed]
