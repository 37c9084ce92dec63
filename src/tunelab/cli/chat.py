"""`tunelab-chat TARGET`: talk to a run's tuned model (or any model) with the template it trained with.

Tokens stream as they are generated. `/reset` forgets the conversation, `/quit` (or end of input)
leaves. Reads stdin line by line, so it is scriptable: `printf 'hi\\n/quit\\n' | tunelab-chat RUN_DIR`.
"""

from __future__ import annotations

import argparse
import sys

from tunelab.cli.common import die, quiet_libraries
from tunelab.errors import TunelabError

COMMANDS = "/reset forgets the conversation, /quit leaves"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tunelab-chat", description=__doc__.splitlines()[0],
                                     epilog="Example: tunelab-chat outputs/default/runs/<time>")
    parser.add_argument("target", help="a run dir, its final/ folder, an HF model folder, or embedded:NAME")
    parser.add_argument("--system", default=None, help="a system prompt at the start of every conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--precision", default="auto", help="auto (what training would use on this machine), bf16-mixed or 32-true")
    parser.add_argument("--no-stream", action="store_true", help="print each reply whole")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="the generation engine (vllm: a vLLM server from .venv-vllm, replies printed whole)")
    parser.add_argument("--vllm-server-base-url", default=None,
                        help="with --engine vllm: a running vLLM server serving this model (default: start one)")
    parser.add_argument("--allow-template-mismatch", action="store_true",
                        help="chat even if the tokenizer or template differs from the run's (refused by default)")
    return parser.parse_args(argv)


class Session:
    """One conversation with a model: the history, the prompt template, and generation settings."""

    def __init__(self, model, tokenizer, template: str = "chat", system: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, precision: str = "auto"):
        from tunelab.data.templates import PromptFormatter

        self.model, self.tokenizer = model.eval(), tokenizer
        self.formatter = PromptFormatter(tokenizer, template)
        self.system = system
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        self.generation = {"max_new_tokens": max_new_tokens, **sampling}
        self.precision = precision
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self, text: str) -> str:
        if self.formatter.template != "chat":  # a custom template is single-turn: no history
            self.reset()
        self.messages.append({"role": "user", "content": text})
        return self.formatter.generation_prompt(self.messages)

    def reply(self, text: str, out) -> str:
        """The model's answer through the generation engine, streamed to `out` token by token where the
        engine streams (hf), else written whole by the caller."""
        from tunelab.core.generation import active_engine, generate_completions

        streaming = out is not None and active_engine().name == "hf"
        options = {"streamer": TextStream(self.tokenizer, out)} if streaming else {}
        [done] = generate_completions(self.model, self.tokenizer, [self.prompt(text)], batch_size=1,
                                      precision=self.precision, description=None, **self.generation, **options)
        if out is not None and not streaming:
            out.write(done.text + "\n")
        self.messages.append({"role": "assistant", "content": done.text})
        return done.text


def TextStream(tokenizer, out):
    """transformers' TextStreamer, writing to `out` instead of print()'s stdout."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def configure_engine(args: argparse.Namespace):
    """The generation group's defaults (conf/generation/default.yaml) with the command line's choices on top."""
    from omegaconf import OmegaConf

    from tunelab.core.generation import configure
    from tunelab.paths import CONF_DIR

    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "generation" / "default.yaml"))
    settings |= {"engine": getattr(args, "engine", "hf"), "vllm_server_base_url": getattr(args, "vllm_server_base_url", None)}
    return configure(settings)


def methods_by_output() -> dict[bool, list[str]]:
    """{True: methods whose runs write text, False: those whose final/ scores or embeds it} (conf/method/*.yaml's
    `generates`, default true), so a new method is listed without touching this file."""
    from omegaconf import OmegaConf

    from tunelab.paths import CONF_DIR

    found = {True: [], False: []}
    for path in sorted((CONF_DIR / "method").glob("*.yaml")):
        method = OmegaConf.load(path).get("method") or {}
        found[bool(method.get("generates", True))].append(str(method.get("name", path.stem)))
    return found


def refuse_non_generating(target: str, run_config) -> None:
    method = run_config.get("method") if run_config is not None else None
    if method is None:
        return
    name = str(method.get("name", "?"))
    by_output = methods_by_output()
    if method.get("generates", True) and name not in by_output[False]:
        return
    raise TunelabError(f"{target} is a method={name} run: its model scores or embeds text and writes none, so there is "
                       f"nothing to chat with; tunelab-chat talks to runs of {', '.join(by_output[True])} "
                       "(or any causal LM folder)")


def load_session(args: argparse.Namespace) -> Session:
    from tunelab.eval.targets import chat_template_of, resolve_target
    from tunelab.models.loading import load_pretrained

    configure_engine(args)

    target = resolve_target(args.target)
    refuse_non_generating(args.target, target.run_config)  # before loading: a reward or embedding model writes nothing
    model, tokenizer = load_pretrained(target.model_path)
    from tunelab.run.provenance import gate_target  # the fidelity gate: the run's own tokenizer and template

    gate_target(target.model_path, tokenizer, chat_template_of(target.run_config),
                getattr(args, "allow_template_mismatch", False))
    return Session(model, tokenizer, chat_template_of(target.run_config), args.system, args.max_new_tokens,
                   args.temperature, args.top_p, args.precision)


def loop(session: Session, stdin, stdout, stream: bool = True, interactive: bool = False) -> int:
    """Answer each line of stdin; returns the number of replies given."""
    replies = 0
    if interactive:
        stdout.write(f"({COMMANDS})\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return replies
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            stdout.write("(conversation reset)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"(unknown command {text}; {COMMANDS})\n")
            continue
        if interactive:
            stdout.write("model> ")
        answer = session.reply(text, stdout if stream else None)
        if not stream:
            stdout.write(answer + "\n")
        stdout.flush()
        replies += 1


def main(argv: list[str] | None = None, stdin=None, stdout=None) -> None:
    quiet_libraries()
    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        session = load_session(args)
    except TunelabError as err:
        die(str(err), err.exit_code)
    loop(session, stdin, stdout, stream=not args.no_stream, interactive=stdin.isatty())


if __name__ == "__main__":
    main()
