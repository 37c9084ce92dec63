"""Render examples as text segments marked supervised or not, with the chat template or a custom one."""

from __future__ import annotations

from tunelab.data.formats import Conversation, Document, Example
from tunelab.errors import TunelabError

Segments = list[tuple[str, bool]]
# A shell and Hydra's override grammar pass `\n` as two characters; in a prompt template they mean a newline.
ESCAPES = {"\\n": "\n", "\\t": "\t"}


def unescape(template: str) -> str:
    for written, meant in ESCAPES.items():
        template = template.replace(written, meant)
    return template


class PromptFormatter:
    """`template="chat"` uses the tokenizer's chat template; any other string is a prompt template
    with `{prompt}` (and optionally `{system}`), after which the response and EOS follow."""

    def __init__(self, tokenizer, template: str = "chat"):
        self.tokenizer = tokenizer
        self.template = template = unescape(template)
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise TunelabError(
                "the tokenizer has no chat template; set data.template to a prompt template string, "
                "e.g. data.template='### Question:\\n{prompt}\\n\\n### Answer:\\n'"
            )
        if template != "chat" and "{prompt}" not in template:
            raise TunelabError(f"data.template must contain {{prompt}} (or be 'chat'); got {template!r}")

    def segments(self, example: Example) -> Segments:
        if isinstance(example, Document):
            return [(example.text + self.tokenizer.eos_token, True)]
        if self.template == "chat":
            return self.chat_segments(example)
        return [(self.generation_prompt(example.prompt), False), (example.reference + self.tokenizer.eos_token, True)]

    def generation_prompt(self, messages: list[dict]) -> str:
        """The text a model continues from to produce the next assistant turn."""
        if self.template == "chat":
            return self.render(messages, add_generation_prompt=True)
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) != 1 or turns[0]["role"] != "user":
            raise TunelabError(
                "a custom data.template handles single-turn prompts only; use data.template=chat for multi-turn data"
            )
        return self.template.format(prompt=turns[0]["content"], system=system)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat_segments(self, conversation: Conversation) -> Segments:
        """Split the rendered conversation at each assistant turn.

        Rendering the prefix before and after each assistant message (rather than searching the text)
        marks exactly what the template adds for that turn, end-of-turn token included."""
        messages = list(conversation.messages)
        segments: Segments = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            full = self.render(messages[: index + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise TunelabError(
                    "the chat template does not render conversations as growing prefixes, so response tokens "
                    "cannot be located; set data.template to a prompt template string"
                )
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        if not segments:
            raise TunelabError("a conversation has no assistant message to learn from; check the data's roles")
        return [(text, supervised) for text, supervised in segments if text]
