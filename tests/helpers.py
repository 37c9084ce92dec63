"""Helpers for tests: compose a config like the CLI does, and run the train function in-process."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from tunelab.paths import CONF_DIR
from tunelab.run.compose import compose_job

# Every method, read from conf/method: a new method is in every per-method test without editing a list.
METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))

# A tiny random Llama, CSV only, no progress bars: a run takes seconds.
FAST = ["debug=fast", "trainer.enable_progress_bar=false"]


def embedded_tokenizer():
    from tunelab.models.loading import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


def make_cfg(run_dir: Path, *overrides: str, fast: bool = True, config: str = "train") -> DictConfig:
    """The job config the CLI would build for these overrides, with Hydra's runtime set up."""
    return compose_job(config, [*(FAST if fast else []), *overrides], run_dir)


def run_train(run_dir: Path, *overrides: str) -> dict:
    from tunelab.run.train import train

    run_dir.mkdir(parents=True, exist_ok=True)
    return train(make_cfg(run_dir, *overrides))


def run_ddp(run_dir: Path, *overrides: str, timeout: int = 900, trainer: str = "ddp") -> dict:
    """Run the CLI with trainer=ddp or fsdp (2 CPU processes) into run_dir; its metrics.json once both ranks ran.

    A subprocess, since DDP launches its second rank by re-running the command line. PYTHONPATH holds the
    repo root, so a config may point at test code (e.g. a reward function in tests/), and its src/."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tunelab.cli.train", *FAST, f"trainer={trainer}", *overrides, f"hydra.run.dir={run_dir}"]
    root = Path(__file__).resolve().parents[1]  # with src/: a checkout other than the installed one tests itself
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=run_dir.parent, env=env)
    (run_dir.parent / f"{run_dir.name}.out").write_text(result.stdout + result.stderr)  # what it printed, beside it
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout  # Lightning's line for the second process
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wandb_records(run_file: Path):
    """Records of an offline W&B run file (a 7-byte W&B header, then LevelDB-log framed protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, block, offset, pending = run_file.read_bytes(), 32768, 7, b""
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # block trailer padding
            offset += room
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


class SignalAt:
    """A Lightning callback that sends this process a real signal after the given training batch."""

    def __new__(cls, batch: int, signum: str = "SIGTERM"):
        import os
        import signal

        from pytorch_lightning import Callback

        class _SignalAt(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
                if trainer.fit_loop.total_batch_idx == batch:
                    os.kill(os.getpid(), getattr(signal, signum))

        return _SignalAt()
