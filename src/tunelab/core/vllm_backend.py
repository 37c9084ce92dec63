"""The vLLM backend of the generation engine, in TRL's two modes (`GRPOConfig.vllm_mode`):

- `server`: vLLM's own OpenAI-compatible server (`vllm serve`) in its own environment (.venv-vllm, built by
  scripts/setup_vllm.sh: vLLM pins a transformers this project does not use). tunelab starts it on the policy's
  base weights (or uses one at `vllm_server_base_url`), sends prompts as token ids to `/v1/completions` and reads
  the completions back as token ids with their log-probs. After each policy update a LoRA adapter is saved and
  loaded into the running server (`/v1/load_lora_adapter`, VLLM_ALLOW_RUNTIME_LORA_UPDATING) under a new name,
  and sampled with that name; full weights are reloaded in place from a saved folder (vLLM's `reload_weights`).
- `colocate`: `vllm.LLM` inside the training process, on the training GPU, asleep between rollouts
  (`vllm_enable_sleep_mode`); vllm must be importable in the training environment (CUDA only).

Departures from TRL (1.16's VLLMClient talks to vLLM's server too): TRL syncs every weight over NCCL (CUDA only)
and samples `n` completions per unique prompt; here a LoRA travels as an adapter folder, full weights as a
folder vLLM reloads (any device), and every row is its own request with its own seed, drawn from the caller's
torch RNG, so a seeded run samples the same completions again and a resumed one continues its stream.
Log-probs are vLLM's `processed_logprobs` (after temperature), the trainer's convention when top_k=0, top_p=1.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from tunelab.core.generation import Engine, Samples, as_id_list, finish
from tunelab.errors import TunelabError
from tunelab.paths import REPO_DIR

log = logging.getLogger(__name__)

MODES = ("server", "colocate")
SETUP = "bash scripts/setup_vllm.sh"


@dataclass
class VLLMSettings:
    """The `generation` group's vLLM keys, with TRL's names (GRPOConfig.vllm_*)."""

    vllm_mode: str = "server"
    vllm_server_base_url: str | None = None      # a running server; null: tunelab starts one (and stops it)
    vllm_server_host: str = "127.0.0.1"
    vllm_server_port: int | None = None          # null: a free port
    vllm_server_timeout: float = 600.0           # seconds to wait for the server to answer /health
    vllm_python: str | None = None               # the interpreter with vllm (null: $TUNELAB_VLLM_PYTHON or .venv-vllm)
    vllm_gpu_memory_utilization: float = 0.3
    vllm_enable_sleep_mode: bool = False
    vllm_max_model_length: int | None = None
    vllm_tensor_parallel_size: int = 1
    vllm_dtype: str = "auto"                     # auto: the policy's compute dtype (trainer.precision)
    vllm_kwargs: dict = field(default_factory=dict)   # any other vLLM option, spelled as vLLM spells it
    vllm_env: dict = field(default_factory=dict)      # environment of the server (e.g. VLLM_CPU_KVCACHE_SPACE)


def build_vllm_engine(settings: dict) -> Engine:
    known = {f.name for f in fields(VLLMSettings)}
    unknown = sorted(set(settings) - known - {"engine", "use_vllm"})
    if unknown:
        raise TunelabError(f"generation.{unknown[0]} is not a vLLM setting; known: {', '.join(sorted(known))}")
    values = VLLMSettings(**{k: v for k, v in settings.items() if k in known})
    values.vllm_kwargs, values.vllm_env = dict(values.vllm_kwargs or {}), dict(values.vllm_env or {})
    if values.vllm_mode not in MODES:
        raise TunelabError(f"generation.vllm_mode={values.vllm_mode} is not known; use server or colocate")
    return VLLMServerEngine(values) if values.vllm_mode == "server" else VLLMColocateEngine(values)


# ---------------------------------------------------------------- what the policy is, as vLLM sees it


def is_peft_model(model) -> bool:
    from tunelab.models.adapters import is_peft

    return is_peft(model)


@torch.no_grad()
def weights_version(model, trainable_only: bool) -> tuple:
    """Changes whenever an optimizer step touches a weight: torch's version counter of each tensor, and its
    sum (a fused AdamW step writes in place without bumping the counter)."""
    return tuple((p._version, p.float().sum().item()) for p in model.parameters() if p.requires_grad or not trainable_only)


def dtype_name(precision: str | None, model) -> str:
    """vLLM's --dtype for the compute precision the HF backend would autocast to (bf16-mixed: bfloat16; auto: as
    tunelab resolves it on the model's device), else the weights' own dtype (32-true: float32)."""
    from tunelab.platform.hardware import autocast_dtype

    param = next(model.parameters())
    dtype = autocast_dtype(precision, param.device) or param.dtype
    return str(dtype).removeprefix("torch.")


def has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))


def base_folder(model, workdir: Path) -> str:
    """A folder vLLM can load holding the weights the policy's adapter sits on (or the full model's own)."""
    from tunelab.models.adapters import adapter_changes_base
    from tunelab.models.export import save_base
    from tunelab.models.loading import resolve_model_path
    from tunelab.models.qlora import is_4bit

    if is_peft_model(model):
        name = next(iter(model.peft_config.values())).base_model_name_or_path
        if name and not adapter_changes_base(model) and not is_4bit(model):
            path = Path(resolve_model_path(name))
            if has_weights(path):
                return str(path)
        folder = workdir / f"base-{id(model)}"  # written once per policy object
        if not has_weights(folder):
            save_base(model, folder)
        return str(folder)
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    if name and Path(name).is_dir() and has_weights(Path(name)):
        return str(name)
    folder = workdir / f"base-{id(model)}"
    if not has_weights(folder):
        model.save_pretrained(folder)
    return str(folder)


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention kernels


def tokenizer_folder(base: str, tokenizer, workdir: Path) -> str | None:
    """Where the server reads its tokenizer (it renders log-probs with it): the base's own, else the caller's
    saved beside it, else None (the server then starts without one: token ids only, no log-probs)."""
    if any((Path(base) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return base
    if tokenizer is None:
        return None
    folder = workdir / f"tokenizer-{id(tokenizer)}"
    if not (folder / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(folder)
    return str(folder)


def check_cpu_head_size(model) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; say so before a server dies of it."""
    config = model.config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in CPU_HEAD_SIZES:
        raise TunelabError(f"vLLM on a CPU has no attention kernel for head size {head} (it has "
                           f"{', '.join(map(str, CPU_HEAD_SIZES))}); use generation.engine=hf for this model "
                           "(the tiny test model with model.hidden_size=128 model.num_attention_heads=2 has 64)")


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def lora_rank(model) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds the policy's adapter."""
    rank = max(int(getattr(c, "r", 8)) for c in model.peft_config.values())
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise TunelabError(f"adapter.r={rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}; "
                           "lower it or use generation.engine=hf")
    return fitting[0]


# ---------------------------------------------------------------- the shared part of both modes


class VLLMEngine(Engine):
    """Prompts as token ids in, completions as token ids with log-probs out; the policy kept in step."""

    name = "vllm"

    def __init__(self, settings: VLLMSettings):
        self.settings = settings
        self.workdir = Path(tempfile.mkdtemp(prefix="tunelab-vllm-"))
        self.served: dict = {}        # base folder, dtype, lora -> what the backend was started with
        self.policy: dict = {}        # id and weights version of the model the backend holds
        self.adapter: str | None = None
        self.adapters_loaded = self.weight_pushes = 0
        atexit.register(self.close)

    # -- what a backend implements

    def start(self, served: dict) -> None:
        """Start serving `served`: base (a model folder), tokenizer (a folder or None), dtype, lora (max rank)."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    def unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    def push_weights(self, model) -> None:
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], params: list[dict]) -> list[tuple[list[int], list[float] | None]]:
        raise NotImplementedError

    # -- sampling

    @torch.no_grad()
    def sample(self, model, query, query_mask, *, max_new_tokens, eos_token_id, pad_token_id, temperature=1.0,
               top_k=0, top_p=1.0, do_sample=True, return_logprobs=True, precision=None, tokenizer=None,
               **options) -> Samples:
        dtype = dtype_name(precision, model) if self.settings.vllm_dtype == "auto" else self.settings.vllm_dtype
        self.sync(model, dtype, tokenizer)
        if self.served.get("tokenizer") is None:
            return_logprobs = False  # vLLM renders log-probs with the tokenizer; without one it gives none
        prompts = [ids[m.bool()].tolist() for ids, m in zip(query, query_mask)]
        seeds = torch.randint(2**31 - 1, (len(prompts),)).tolist()  # from the caller's RNG stream
        params = [sampling_params(max_new_tokens, eos_token_id, temperature, top_k, top_p, do_sample,
                                  return_logprobs, seed, options) for seed in seeds]
        outputs = self.generate(prompts, params)
        width = max([len(ids) for ids, _ in outputs] + [1])
        response = torch.full((len(outputs), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), width) if return_logprobs and do_sample else None
        for row, (ids, lps) in enumerate(outputs):
            response[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            if logprobs is not None:
                logprobs[row, : len(ids)] = torch.tensor(lps, dtype=torch.float)
        device = query.device
        return finish(response.to(device), None if logprobs is None else logprobs.to(device), eos_token_id,
                      pad_token_id)

    # -- keeping the served policy the trained one

    def sync(self, model, dtype: str, tokenizer=None) -> None:
        """Start the backend on the policy's base weights, then bring it level with the policy: a new LoRA
        adapter after each update (PEFT), or the full weights reloaded from a folder."""
        peft = is_peft_model(model)
        if not torch.cuda.is_available():
            check_cpu_head_size(model)
        base = base_folder(model, self.workdir)
        wanted = {"base": base, "tokenizer": tokenizer_folder(base, tokenizer, self.workdir), "dtype": dtype,
                  "lora": lora_rank(model) if peft else None}
        if self.served and wanted["tokenizer"] is None:
            wanted["tokenizer"] = self.served["tokenizer"]  # a caller with no tokenizer at hand keeps the served one
        if self.served != wanted:
            if self.served:
                self.stop()
            self.start(wanted)
            self.served, self.policy, self.adapter = wanted, {"id": id(model), "version": weights_version(model, peft)}, None
            if not peft:
                return  # the server holds the full model's own files
        version = weights_version(model, peft)
        changed = self.policy != {"id": id(model), "version": version}
        if peft and (changed or self.adapter is None):
            self.swap_adapter(model)
        elif not peft and changed:
            self.push_weights(model)
        self.policy = {"id": id(model), "version": version}

    def swap_adapter(self, model) -> None:
        """Save the policy's adapter and load it under a new name (vLLM caches adapters by name)."""
        self.adapters_loaded += 1
        name = f"tunelab-{self.workdir.name.removeprefix('tunelab-vllm-')}-{self.adapters_loaded}"  # unique per engine
        folder = self.workdir / "adapters" / name
        model.save_pretrained(folder)
        self.load_adapter(name, str(folder / adapter_subfolder(model)))
        if self.adapter is not None:
            self.unload_adapter(self.adapter)
            shutil.rmtree(self.workdir / "adapters" / self.adapter, ignore_errors=True)
        self.adapter = name

    def close(self) -> None:
        if self.served:
            try:
                self.stop()
            finally:
                self.served, self.adapter = {}, None
        shutil.rmtree(self.workdir, ignore_errors=True)


def adapter_subfolder(model) -> str:
    """PEFT saves the `default` adapter at the top of the folder and any other under its own name."""
    name = getattr(model, "active_adapter", "default")
    return "" if name == "default" else name


def sampling_params(max_new_tokens, eos_token_id, temperature, top_k, top_p, do_sample, return_logprobs, seed,
                    options: dict) -> dict:
    """One request's sampling settings in vLLM's names (greedy: temperature 0)."""
    unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
    if unknown:
        raise TunelabError(f"generation option {unknown[0]} has no vLLM equivalent here; known: "
                           f"{', '.join(SAMPLING_OPTIONS)} (or use generation.engine=hf)")
    params = {"max_tokens": int(max_new_tokens), "seed": int(seed), "stop_token_ids": as_id_list(eos_token_id),
              "skip_special_tokens": False, "include_stop_str_in_output": True,
              "temperature": float(temperature if temperature is not None else 1.0) if do_sample else 0.0,
              "top_p": float(top_p) if do_sample and top_p is not None else 1.0,
              "top_k": int(top_k) if do_sample and top_k else 0}
    if return_logprobs and do_sample:
        params["logprobs"] = 0  # the sampled token's own log-prob only
    params |= {SAMPLING_OPTIONS[name]: value for name, value in options.items()}
    return params


SAMPLING_OPTIONS = {"repetition_penalty": "repetition_penalty", "min_p": "min_p", "min_new_tokens": "min_tokens"}


# ---------------------------------------------------------------- server mode


def vllm_python(settings: VLLMSettings) -> str:
    """The interpreter of vLLM's own environment, or one clear line on how to build it."""
    python = settings.vllm_python or os.environ.get("TUNELAB_VLLM_PYTHON") or str(REPO_DIR / ".venv-vllm/bin/python")
    if not Path(python).is_file():
        raise TunelabError(f"generation.engine=vllm (server mode) needs vLLM's environment at {python}; build it with "
                           f"`{SETUP}` or point generation.vllm_python at a python with vllm")
    return python


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def cli_flags(options: dict) -> list[str]:
    """vLLM options (its own names, - or _) as `vllm serve` flags: true -> --flag, a dict -> JSON."""
    flags = []
    for name, value in options.items():
        flag = "--" + str(name).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


class VLLMServer:
    """`vllm serve` as a child process of its own session: started, waited for, stopped with its children."""

    def __init__(self, python: str, model: str, host: str, port: int, options: dict, env: dict, log_path: Path):
        # `vllm serve`'s own entry point: the `vllm` CLI of vllm-cpu 0.32.0 looks up a distribution named vllm
        # (it is vllm-cpu) and exits, and this module is the same server in both builds
        self.command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
                        "--port", str(port), *cli_flags(options)]
        self.url, self.env, self.log_path = f"http://{host}:{port}", env, log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        log.info("starting the vLLM server: %s (log: %s)", " ".join(self.command), self.log_path)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, stdin=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TunelabError(f"the vLLM server exited with code {self.process.returncode} while starting: "
                                   f"{last_error(self.log_path)} (log: {self.log_path})")
            if healthy(self.url):
                return
            time.sleep(1.0)
        self.stop()
        raise TunelabError(f"the vLLM server did not answer {self.url}/health within {timeout:.0f} s; raise "
                           f"generation.vllm_server_timeout (log: {self.log_path})")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the training process dies, even by SIGKILL (no orphan holding memory)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def post(url: str, body: dict, timeout: float = 600.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise TunelabError(f"the vLLM server refused {url.rsplit('/', 1)[-1]} ({err.code}): {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise TunelabError(f"the vLLM server at {url} did not answer ({err}); is it still running?") from None
    try:
        return json.loads(text)
    except ValueError:  # some routes answer in plain text ("Success: LoRA adapter ... added")
        return {"text": text.decode(errors="replace")}


class VLLMServerEngine(VLLMEngine):
    """`vllm serve` in .venv-vllm: ours (started on the policy's base) or one at vllm_server_base_url."""

    def __init__(self, settings: VLLMSettings):
        # before anything loads: a run that would start a server says at once where vLLM's environment is missing
        self.python = None if settings.vllm_server_base_url else vllm_python(settings)
        super().__init__(settings)
        self.server: VLLMServer | None = None
        self.url = (settings.vllm_server_base_url or "").rstrip("/") or None
        self.model_name: str | None = None

    def start(self, served: dict) -> None:
        s = self.settings
        if s.vllm_server_base_url:  # the user's server: it serves what it serves; check it answers
            if not healthy(self.url):
                raise TunelabError(f"no vLLM server answers at {self.url} (generation.vllm_server_base_url); start "
                                   "one, or leave it null and tunelab starts one")
            self.model_name = self.served_model_name()
            return
        host = s.vllm_server_host
        port = int(s.vllm_server_port or free_port(host))
        self.url = f"http://{host}:{port}"
        if healthy(self.url):
            raise TunelabError(f"something already answers at {self.url}; use generation.vllm_server_base_url={self.url} "
                               "to sample from it, or another generation.vllm_server_port")
        options = {"dtype": served["dtype"], "max_model_len": s.vllm_max_model_length,
                   "logprobs_mode": "processed_logprobs", "served_model_name": "policy",
                   "tensor_parallel_size": s.vllm_tensor_parallel_size,
                   "tokenizer": served["tokenizer"], "skip_tokenizer_init": served["tokenizer"] is None,
                   "gpu_memory_utilization": s.vllm_gpu_memory_utilization if torch.cuda.is_available() else None}
        if served["lora"]:
            options |= {"enable_lora": True, "max_lora_rank": served["lora"], "max_loras": 2}
        options |= s.vllm_kwargs
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1",
               **{k: str(v) for k, v in s.vllm_env.items()}}
        self.server = VLLMServer(self.python, served["base"], host, port, options, env, self.workdir / "server.log")
        self.server.start(s.vllm_server_timeout)
        self.model_name = "policy"

    def served_model_name(self) -> str:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=30) as response:
            return json.loads(response.read())["data"][0]["id"]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def load_adapter(self, name: str, path: str) -> None:
        post(f"{self.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> None:
        post(f"{self.url}/v1/unload_lora_adapter", {"lora_name": name})

    def push_weights(self, model) -> None:
        """Full weights through vLLM's in-place reload from a folder (`reload_weights(weights_path=...)` over
        /collective_rpc, VLLM_SERVER_DEV_MODE): a route every vLLM device has, the CPU included. vLLM's NCCL
        and CUDA-IPC weight transfer (no disk) are faster on GPUs; they are not used here."""
        self.weight_pushes += 1
        folder = self.workdir / "weights" / str(self.weight_pushes)
        model.save_pretrained(folder, safe_serialization=True)
        post(f"{self.url}/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}},
             timeout=self.settings.vllm_server_timeout)
        post(f"{self.url}/reset_prefix_cache", {})
        shutil.rmtree(self.workdir / "weights" / str(self.weight_pushes - 1), ignore_errors=True)

    def generate(self, prompts, params):
        model = self.adapter or self.model_name

        def one(args):
            ids, p = args
            reply = post(f"{self.url}/v1/completions", {"model": model, "prompt": ids, "return_token_ids": True, **p},
                         timeout=self.settings.vllm_server_timeout)
            choice = reply["choices"][0]
            token_ids = list(choice["token_ids"])
            logprobs = choice.get("logprobs")
            return token_ids, (list(logprobs["token_logprobs"]) if logprobs else None)

        with ThreadPoolExecutor(max_workers=min(64, max(len(prompts), 1))) as pool:
            return list(pool.map(one, zip(prompts, params)))


# ---------------------------------------------------------------- colocate mode


class VLLMColocateEngine(VLLMEngine):
    """`vllm.LLM` in this process on the training GPU, asleep between rollouts when vllm_enable_sleep_mode.

    Not run on this project's CPU machines (no CUDA); it refuses in one line where it cannot run."""

    def __init__(self, settings: VLLMSettings):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise TunelabError("generation.vllm_mode=colocate needs vllm importable in the training environment "
                               "(pip install vllm==0.33.0, CUDA only); on a CPU use generation.vllm_mode=server "
                               f"(`{SETUP}`)") from None
        if not torch.cuda.is_available():
            raise TunelabError("generation.vllm_mode=colocate needs a CUDA GPU (vLLM shares it with training); "
                               f"on a CPU use generation.vllm_mode=server (`{SETUP}`)")
        super().__init__(settings)
        self.llm = None
        self.lora_ids: dict[str, int] = {}
        self.asleep = False

    def start(self, served: dict) -> None:
        from vllm import LLM

        s = self.settings
        options = {"model": served["base"], "tokenizer": served["tokenizer"], "dtype": served["dtype"],
                   "skip_tokenizer_init": served["tokenizer"] is None,
                   "gpu_memory_utilization": s.vllm_gpu_memory_utilization,
                   "tensor_parallel_size": s.vllm_tensor_parallel_size, "max_model_len": s.vllm_max_model_length,
                   "enable_sleep_mode": s.vllm_enable_sleep_mode, "logprobs_mode": "processed_logprobs",
                   # as TRL: vLLM's profiler otherwise reserves for 32k tokens a batch and finds no room
                   "max_num_batched_tokens": 4096}
        if served["lora"]:
            options |= {"enable_lora": True, "max_lora_rank": served["lora"], "max_loras": 2}
        self.llm = LLM(**(options | s.vllm_kwargs))
        self.asleep = False

    def stop(self) -> None:
        self.llm = None
        torch.cuda.empty_cache()

    def load_adapter(self, name: str, path: str) -> None:
        self.lora_ids[name] = len(self.lora_ids) + 1
        self.lora_paths = {**getattr(self, "lora_paths", {}), name: path}

    def unload_adapter(self, name: str) -> None:
        if self.llm is not None and name in self.lora_ids:
            self.llm.llm_engine.remove_lora(self.lora_ids[name])

    def push_weights(self, model) -> None:
        """The trained weights straight into vLLM's model, as TRL's colocate mode does."""
        self.wake()
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights((name, param.data) for name, param in model.named_parameters())
        self.llm.reset_prefix_cache()

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompts, params):
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        self.wake()
        lora = None
        if self.adapter is not None:
            lora = LoRARequest(self.adapter, self.lora_ids[self.adapter], self.lora_paths[self.adapter])
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        sampling = [SamplingParams(**{k: v for k, v in p.items() if k != "include_stop_str_in_output"}) for p in params]
        outputs = self.llm.generate(requests, sampling_params=sampling, lora_request=lora, use_tqdm=False)
        if self.settings.vllm_enable_sleep_mode:  # level 1: weights to CPU memory, the KV cache freed
            self.llm.sleep(level=1)
            self.asleep = True
        rows = []
        for out in outputs:
            completion = out.outputs[0]
            logprobs = None
            if completion.logprobs is not None:
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
            rows.append((list(completion.token_ids), logprobs))
        return rows
