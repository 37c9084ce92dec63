"""tunelab GRPO vs TRL's GRPOTrainer, side by side in one invocation, on one workload (issue 25, item 5).

    python benchmarks/bench_grpo.py                                   # all four runners, 10 timed updates each
    python benchmarks/bench_grpo.py --runners tunelab-hf,trl-hf --timed 20
    python benchmarks/bench_grpo.py --model tiny --warmup 1 --timed 2 --completion-length 4   # seconds: the test's size

The workload, the same for every runner: the embedded SmolLM2-135M-Instruct, LoRA r8 (alpha 16) on all linear
layers, the shipped arithmetic task's training prompts through the chat template, 4 prompts x 4 completions
per update (one generation batch, one optimizer step), 24 new tokens at most, temperature 0.7 (top_k 0,
top_p 1), loss_type dapo, beta 0 (no reference model), epsilon 0.2, the rewards `correct` + 0.2 x `format` of
conf/method/grpo.yaml, AdamW at 5e-4 with 2 warm-up steps, max grad norm 1, no gradient checkpointing, one
precision for all (`--precision auto`: what tunelab's `trainer.precision=auto` picks on this machine).

Runners (each in its own process, one after the other, so each has its own peak memory):
- tunelab-hf: `experiment=grpo_arithmetic` with `generation.engine=hf` (transformers generate);
- trl-hf: TRL's GRPOTrainer with its HF generate (`use_vllm=False`);
- tunelab-vllm: `generation.engine=vllm` (a vLLM server from .venv-vllm, started by the engine, LoRA loaded
  after each update);
- trl-vllm: `use_vllm=True, vllm_mode="server"` against the same kind of server; TRL needs vllm importable in
  the training environment and syncs weights over NCCL (CUDA), so where that cannot run the row says why.

Per runner: s/update (wall time of an update: rollout, rewards, loss, backward, optimizer step; the first
`--warmup` updates, which include a server start, not timed), generated tokens/s (completion tokens, EOS
included, per second of the generation phase: the engine's speed), trained tokens/s (prompt + completion
tokens through the training forward per second of update), the generation share of update time, and peak
memory (the training process; the vLLM server's own processes apart). Results go to stdout and, as JSON
naming the CPU (`lscpu` model name, torch's CPU capability) or GPU, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNERS = ("tunelab-hf", "trl-hf", "tunelab-vllm", "trl-vllm")
TINY = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # head size 64 (vLLM's CPU kernels)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runners", default=",".join(RUNNERS), help=f"comma list of {', '.join(RUNNERS)}")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates per runner (a vLLM server starts in the first)")
    ap.add_argument("--timed", type=int, default=10, help="timed updates per runner")
    ap.add_argument("--model", default="embedded", choices=("embedded", "tiny"),
                    help="embedded: SmolLM2-135M-Instruct; tiny: a random 2-layer Llama (checks the script in seconds)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per update")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--completion-length", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--precision", default="auto", help="auto (tunelab's choice for this machine), 32-true or bf16-mixed")
    ap.add_argument("--device", default="auto", help="auto (the GPU when one is visible), cpu or gpu")
    ap.add_argument("--vllm-server-base-url", default=None,
                    help="a running vLLM server on the model for the vllm runners (default: tunelab's engine starts one)")
    ap.add_argument("--work", default="/tmp/tunelab-bench-grpo", help="scratch folder (worker logs, run dirs)")
    ap.add_argument("--out", default=str(HERE / "bench_grpo.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- the machine


def machine() -> dict:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in run_text(["lscpu"]).splitlines()
                if line.startswith("Model name")), platform.processor())
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def resolved(args) -> tuple[str, str]:
    """(accelerator, precision) the runners share, resolved once as tunelab resolves `auto`."""
    import torch

    from tunelab.platform.hardware import auto_precision

    device = args.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    precision = args.precision if args.precision != "auto" else auto_precision(device).value
    return device, precision


# ---------------------------------------------------------------- timing shared by the runners


class Clock:
    """Per update: wall seconds, generation seconds, generated and trained tokens; memory peak after warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.updates, self.mark = warmup, [], time.perf_counter()
        self.generate_s = self.generated = self.trained = 0
        self.peak_mb = 0.0

    def generation(self, seconds: float, tokens: int) -> None:
        self.generate_s += seconds
        self.generated += tokens

    def update_done(self) -> None:
        from tunelab.run.summary import peak_memory_mb, reset_peak_memory

        now = time.perf_counter()
        row = {"seconds": now - self.mark, "generate_s": self.generate_s, "generated_tokens": self.generated,
               "trained_tokens": self.trained}
        self.updates.append(row)
        self.generate_s = self.generated = self.trained = 0
        if len(self.updates) == self.warmup:
            reset_peak_memory()
        self.peak_mb = peak_memory_mb()
        self.mark = time.perf_counter()

    def result(self) -> dict:
        return {"updates": self.updates, "warmup": self.warmup, "peak_memory_mb": self.peak_mb}


def summarize(result: dict) -> dict:
    timed = result["updates"][result["warmup"] :]
    seconds = sum(u["seconds"] for u in timed) or float("nan")
    generate = sum(u["generate_s"] for u in timed) or float("nan")
    return {"updates": len(timed), "s_per_update": seconds / max(len(timed), 1),
            "median_s_per_update": statistics.median(u["seconds"] for u in timed) if timed else float("nan"),
            "generated_tok_per_s": sum(u["generated_tokens"] for u in timed) / generate,
            "trained_tok_per_s": sum(u["trained_tokens"] for u in timed) / seconds,
            "generated_tokens_per_update": sum(u["generated_tokens"] for u in timed) / max(len(timed), 1),
            "generation_share": generate / seconds, "peak_memory_mb": result["peak_memory_mb"],
            "server_peak_mb": result.get("server_peak_mb")}


# ---------------------------------------------------------------- tunelab


def tunelab_overrides(spec: dict) -> list[str]:
    model = ["model=tiny_llama", *[f"model.{k}={v}" for k, v in TINY.items()]] if spec["model"] == "tiny" else []
    engine = ["generation.engine=vllm"] if spec["runner"] == "tunelab-vllm" else ["generation.engine=hf"]
    if spec["runner"] == "tunelab-vllm" and spec.get("vllm_server_base_url"):
        engine.append(f"generation.vllm_server_base_url={spec['vllm_server_base_url']}")
    return ["experiment=grpo_arithmetic", *model, *engine, "adapter=lora", "adapter.r=8", "adapter.lora_alpha=16",
            "adapter.target_modules=all-linear", f"data.batch_size={spec['prompts']}",
            f"method.module.num_generations={spec['generations']}",
            f"method.module.max_completion_length={spec['completion_length']}",
            f"method.module.temperature={spec['temperature']}", "method.module.top_k=0", "method.module.top_p=1.0",
            "method.module.loss_type=dapo", "method.module.beta=0.0", "method.module.log_samples=0",
            f"trainer.accelerator={spec['device']}", f"trainer.precision={spec['precision']}",
            f"trainer.max_steps={spec['warmup'] + spec['timed']}", "trainer.enable_progress_bar=false",
            "logger=none", "runtime.gradient_checkpointing=false", "seed=42"]


def run_tunelab(spec: dict, work: Path) -> dict:
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir

    from tunelab.core import generation
    from tunelab.paths import CONF_DIR
    from tunelab.run.assemble import assemble, build_trainer, finalize

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=tunelab_overrides(spec))
    finalize(cfg)
    parts = assemble(cfg)
    clock = Clock(spec["warmup"])
    generation.activate(TimedEngine(generation.active_engine(), clock))

    class Updates(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.trained = pl_module.take_token_counts().get("tokens_processed", 0)
            clock.update_done()

    trainer = build_trainer(cfg, logger=False, callbacks=[Updates()], enable_checkpointing=False,
                            default_root_dir=str(work), enable_progress_bar=False)
    parts.module.take_token_counts()
    trainer.fit(parts.module, datamodule=parts.datamodule)
    result = clock.result()
    engine = generation.active_engine().inner
    server = getattr(engine, "server", None)
    if server is not None and server.process is not None:
        result["server_peak_mb"] = process_tree_peak_mb(server.process.pid)
    generation.configure(None)  # stops tunelab's own vLLM server
    return result


class TimedEngine:
    """The configured generation engine, timed and its sampled tokens counted (every backend alike)."""

    def __init__(self, inner, clock: Clock):
        self.inner, self.clock, self.name = inner, clock, inner.name

    def sample(self, *args, **kwargs):
        start = time.perf_counter()
        samples = self.inner.sample(*args, **kwargs)
        self.clock.generation(time.perf_counter() - start, int(samples.mask.sum()))
        return samples

    def complete(self, *args, **kwargs):
        return self.inner.complete(*args, **kwargs)

    def close(self) -> None:
        self.inner.close()


def process_tree_peak_mb(pid: int) -> float:
    """Sum of the peak resident memory (VmHWM) of a process and its descendants (a vLLM server and its engine)."""
    pids, frontier = [pid], [pid]
    while frontier:
        children = Path(f"/proc/{frontier.pop()}/task")
        for task in children.glob("*/children") if children.is_dir() else []:
            found = [int(p) for p in task.read_text().split()]
            pids += found
            frontier += found
    total = 0.0
    for p in set(pids):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


# ---------------------------------------------------------------- TRL


def trl_dataset(spec: dict):
    """The arithmetic task's training prompts as tunelab formats them (chat template), with their references."""
    from datasets import Dataset
    from hydra import compose, initialize_config_dir

    from tunelab.paths import CONF_DIR
    from tunelab.run.assemble import build_datamodule, load_tokenizer

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=grpo_arithmetic"])
    tokenizer = load_tokenizer(cfg)
    datamodule = build_datamodule(cfg, tokenizer)
    rows = [{"prompt": datamodule.formatter.generation_prompt(list(e.prompt)), "reference": e.reference}
            for e in datamodule.examples["train"]]
    return Dataset.from_list(rows)


def trl_rewards() -> tuple[list, list[float]]:
    """conf/method/grpo.yaml's rewards as TRL reward functions (completions as text; `reference` a column)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tunelab.paths import CONF_DIR

    method = OmegaConf.load(CONF_DIR / "method" / "grpo.yaml").method.module
    rewards = {name: instantiate(node) for name, node in method.rewards.items() if node is not None}

    def as_trl(name, fn):
        def reward(prompts, completions, reference, **kwargs):
            return [float(x) for x in fn(prompts=prompts, responses=[c.strip() for c in completions], references=reference)]
        reward.__name__ = name
        return reward

    return [as_trl(name, fn) for name, fn in rewards.items()], list(method.reward_weights)


def trl_model(spec: dict):
    if spec["model"] == "tiny":
        from tunelab.models import build_tiny_llama

        return build_tiny_llama(**TINY)
    from tunelab.models.loading import load_pretrained

    return load_pretrained("embedded:smollm2-135m-instruct")


def run_trl(spec: dict, work: Path) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    vllm = spec["runner"] == "trl-vllm"
    if vllm:
        check_trl_vllm(spec)
    clock = Clock(spec["warmup"])

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            clock.generation(time.perf_counter() - start, 0)
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            clock.generated += int(out["completion_mask"].sum())
            return out

        def _compute_loss(self, model, inputs):
            clock.trained += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            return super()._compute_loss(model, inputs)

    class Updates(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.update_done()

    rewards, weights = trl_rewards()
    model, tokenizer = trl_model(spec)
    bf16 = "bf16" in spec["precision"]
    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=spec["prompts"] * spec["generations"],
        num_generations=spec["generations"], gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=spec["completion_length"], temperature=spec["temperature"], top_k=0, top_p=1.0,
        loss_type="dapo", beta=0.0, epsilon=0.2, scale_rewards="group", reward_weights=weights,
        learning_rate=5e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=2, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=spec["warmup"] + spec["timed"], logging_steps=1, save_strategy="no",
        report_to=[], seed=42, bf16=bf16, fp16=False, use_cpu=spec["device"] == "cpu",
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        use_vllm=vllm, vllm_mode="server", vllm_server_base_url=spec.get("vllm_server_base_url"))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Timed(model=model, reward_funcs=rewards, args=args, train_dataset=trl_dataset(spec),
                    processing_class=tokenizer, peft_config=lora, callbacks=[Updates()])
    torch.manual_seed(42)
    trainer.train()
    return clock.result()


def check_trl_vllm(spec: dict) -> None:
    """TRL's server mode: vllm importable here, a server with NCCL weight transfer, a CUDA device to sync from."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        raise NotRunnable("TRL's use_vllm needs vllm importable in the training environment (vllm pins "
                          "transformers<5.20; this environment has tunelab's 5.23)")
    if not torch.cuda.is_available():
        raise NotRunnable("TRL syncs weights to a vLLM server over NCCL (VLLMClient.init_communicator): CUDA only")
    if not spec.get("vllm_server_base_url"):
        raise NotRunnable("TRL's server mode needs a running server: pass --vllm-server-base-url (vllm serve ... "
                          "--weight-transfer-config '{\"backend\":\"nccl\"}')")


class NotRunnable(Exception):
    """This runner cannot run on this machine; the message says why (recorded, not a failure)."""


# ---------------------------------------------------------------- driver


def worker(args) -> None:
    spec = json.loads(args.spec)
    work = Path(spec["work"]) / spec["runner"]
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = (run_tunelab if spec["runner"].startswith("tunelab") else run_trl)(spec, work)
        result["status"] = "ok"
    except NotRunnable as why:
        result = {"status": f"not run: {why}"}
    except Exception as err:  # noqa: BLE001 - the driver reports it as this runner's failure
        from tunelab.errors import TunelabError

        if isinstance(err, TunelabError):
            result = {"status": f"failed: {err}"}
        else:
            raise
    Path(spec["result"]).write_text(json.dumps(result))


def drive(args) -> dict:
    names = [n.strip() for n in args.runners.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RUNNERS))
    if unknown:
        raise SystemExit(f"error: unknown runner {unknown[0]}; choose from {', '.join(RUNNERS)}")
    device, precision = resolved(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "prompts": args.prompts, "generations": args.generations,
                "completion_length": args.completion_length, "temperature": args.temperature, "device": device,
                "precision": precision, "warmup": args.warmup, "timed": args.timed,
                "vllm_server_base_url": args.vllm_server_base_url}
    report = {"machine": machine(), "settings": settings, "runners": {}}
    print(f"bench_grpo: {args.model} model, {args.prompts} prompts x {args.generations} completions, "
          f"{args.completion_length} new tokens, T={args.temperature}, {device}, {precision}; "
          f"{args.warmup} warm-up + {args.timed} timed updates per runner", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    for name in names:
        spec = {**settings, "runner": name, "work": str(work), "result": str(work / f"{name}.json")}
        Path(spec["result"]).unlink(missing_ok=True)
        log = work / f"{name}.log"
        started = time.perf_counter()
        with log.open("w") as out:
            rc = subprocess.run([sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)],
                                stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        result_file = Path(spec["result"])
        result = json.loads(result_file.read_text()) if rc == 0 and result_file.is_file() else \
            {"status": f"failed (exit {rc}): {last_line(log)} (log: {log})"}
        result["wall_s"] = time.perf_counter() - started
        if result["status"] == "ok":
            result["summary"] = summarize(result)
        report["runners"][name] = result
        print(f"  {name}: {result['status'].splitlines()[0]} ({result['wall_s']:.0f} s)", flush=True)
    report["ratios"] = ratios(report["runners"])
    return report


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:200]


def ratios(runners: dict) -> dict:
    """tunelab over TRL at the same backend (updates/s), and vLLM over HF within each (generated tokens/s)."""
    def summary(name):
        return runners.get(name, {}).get("summary")

    out = {}
    for backend in ("hf", "vllm"):
        ours, theirs = summary(f"tunelab-{backend}"), summary(f"trl-{backend}")
        if ours and theirs:
            out[f"tunelab_over_trl_updates_per_s_{backend}"] = theirs["s_per_update"] / ours["s_per_update"]
    for who in ("tunelab", "trl"):
        hf, vllm = summary(f"{who}-hf"), summary(f"{who}-vllm")
        if hf and vllm:
            out[f"{who}_vllm_over_hf_generated_tok_per_s"] = vllm["generated_tok_per_s"] / hf["generated_tok_per_s"]
    return out


def print_table(report: dict) -> None:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_capability']}, {m['cores']} cores)"
    print(f"\n{where}, torch {m['torch']}, load {' '.join(f'{x:.1f}' for x in m['load'])}")
    head = f"{'runner':14s} {'s/update':>9s} {'gen tok/s':>10s} {'train tok/s':>11s} {'gen share':>9s} {'peak MB':>8s}  status"
    print(head)
    for name, r in report["runners"].items():
        s = r.get("summary")
        if not s:
            print(f"{name:14s} {'':>9s} {'':>10s} {'':>11s} {'':>9s} {'':>8s}  {r['status']}")
            continue
        server = f" (+ server {s['server_peak_mb']:.0f})" if s.get("server_peak_mb") else ""
        print(f"{name:14s} {s['s_per_update']:9.3f} {s['generated_tok_per_s']:10.1f} {s['trained_tok_per_s']:11.1f} "
              f"{s['generation_share']:9.0%} {s['peak_memory_mb']:8.0f}  ok{server}")
    for key, value in report["ratios"].items():
        print(f"  {key}: {value:.2f}x")


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT / "src"))
    report = drive(args)
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten {args.out}")
    failed = [n for n, r in report["runners"].items() if r["status"].startswith("failed")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
