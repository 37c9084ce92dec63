"""The one generation engine: its tensor API (`sample -> Samples`), its text API (`generate_completions`),
the choice of backend by config, and the vLLM backend's refusals and request mapping (tests/test_vllm.py
runs a real vLLM server)."""

from __future__ import annotations

import pytest
import torch

from tunelab.core import generation
from tunelab.core.generation import configure, generate_completions, sample, stop_mask
from tunelab.errors import TunelabError


@pytest.fixture(autouse=True)
def hf_engine_after():
    yield
    configure(None)  # the process default again, whatever a test configured


@pytest.fixture(scope="module")
def tiny():
    from tunelab.models import build_tiny_llama

    model, tok = build_tiny_llama()
    return model.eval(), tok


def left_padded(tok, texts):
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def test_stop_mask_by_hand():
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 1, 1, 1]])
    mask, has_eos = stop_mask(response, 2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    mask, has_eos = stop_mask(response, {2, 7})  # several stop tokens: the first of any ends the row
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]] and has_eos.tolist() == [True, True, True]


def test_hf_samples_are_padded_after_the_stop_and_carry_the_trainers_logprobs(tiny):
    from tunelab.methods.reward_model import position_ids

    model, tok = tiny
    query, query_mask = left_padded(tok, ["What is 2+2?", "Name a colour, please."])
    stop = int(model.generate(input_ids=query[:1], attention_mask=query_mask[:1], max_new_tokens=1,
                              do_sample=False, pad_token_id=tok.pad_token_id)[0, -1])  # the first greedy token
    settings = dict(max_new_tokens=6, temperature=0.7, top_k=0, top_p=1.0, eos_token_id=[tok.eos_token_id, stop],
                    pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    samples = sample(model, query, query_mask, **settings)
    response, mask, has_eos, logprobs = samples  # the on-policy generate() shape
    assert response.shape == mask.shape == logprobs.shape and has_eos.shape == (2,)
    assert torch.all(response[mask == 0] == tok.pad_token_id) and torch.all(logprobs[mask == 0] == 0)

    ids, attention = torch.cat([query, response], 1), torch.cat([query_mask, mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
    rescored = torch.log_softmax(logits[:, query.shape[1] - 1 : -1].float() / 0.7, -1)
    rescored = rescored.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(rescored[mask.bool()], logprobs[mask.bool()], atol=1e-4)

    torch.manual_seed(3)
    again = sample(model, query, query_mask, **settings)
    assert torch.equal(again.response, response) and torch.equal(again.logprobs, logprobs)
    greedy = sample(model, query, query_mask, **{**settings, "max_new_tokens": 2}, do_sample=False)
    assert greedy.has_eos[0] and greedy.mask[0].tolist() == [1, 0]  # it ended on the stop token at once


def test_generate_completions_gives_what_hf_generate_gives(tiny):
    """The text API over `sample`: the same texts, end flags and token counts as a plain `generate` call."""
    model, tok = tiny
    prompts = ["Hi", "What is the capital of France?", "Count: one two three"]
    query, query_mask = left_padded(tok, prompts)
    plain = model.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=5, do_sample=False,
                           pad_token_id=tok.pad_token_id)[:, query.shape[1] :]
    stop = int(plain[1, 0])  # make a prompt end at once: its first greedy token becomes a stop token
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    try:
        completions = generate_completions(model, tok, prompts, batch_size=2, max_new_tokens=5, precision=None)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    expected = []
    for row in plain.tolist():
        end = next((n for n, t in enumerate(row) if t in (tok.eos_token_id, stop)), None)
        kept = row if end is None else row[:end]
        expected.append((tok.decode(kept, skip_special_tokens=True).strip(), end is not None, len(kept)))
    assert [(c.text, c.finished, c.new_tokens) for c in completions] == expected
    assert completions[1].finished and completions[1].new_tokens == 0
    assert any(not c.finished for c in completions)  # and others ran to max_new_tokens


def test_the_generation_group_picks_the_engine(tmp_path):
    from tests.helpers import make_cfg

    assert make_cfg(tmp_path).generation.engine == "hf"
    assert make_cfg(tmp_path, "generation=vllm").generation.engine == "vllm"
    url = "http://127.0.0.1:9"  # a server of the user's: nothing is started, nothing of vLLM needed here
    cfg = make_cfg(tmp_path, "generation.engine=vllm", f"generation.vllm_server_base_url={url}")
    engine = configure(cfg.generation)
    assert engine.name == "vllm" and engine.url == url and not engine.served
    assert configure(cfg.generation) is engine  # the same settings keep the same engine (a server stays up)
    assert configure(make_cfg(tmp_path).generation) is generation.DEFAULT and engine.workdir.exists() is False
    assert configure({"use_vllm": True, "vllm_server_base_url": url}).name == "vllm"  # TRL's spelling


@pytest.mark.parametrize("settings, says", [
    ({"engine": "sglang"}, "generation.engine=sglang is not known; use one of hf | vllm"),
    ({"engine": "vllm", "vllm_gpu_memory": 0.5}, "generation.vllm_gpu_memory is not a vLLM setting"),
    ({"engine": "vllm", "vllm_mode": "remote"}, "generation.vllm_mode=remote is not known; use server or colocate"),
    ({"engine": "vllm", "vllm_mode": "colocate"}, "generation.vllm_mode=colocate needs"),
])
def test_bad_engine_settings_are_one_line(monkeypatch, settings, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # colocate: refused here with or without vllm
    with pytest.raises(TunelabError) as err:
        configure(settings)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_server_backend_refuses_what_cannot_run_before_starting_anything(monkeypatch, tmp_path):
    from tunelab.models import build_tiny_llama

    with pytest.raises(TunelabError, match=r"needs vLLM's environment at .*no-python; build it with `bash scripts/setup_vllm.sh`"):
        configure({"engine": "vllm", "vllm_python": str(tmp_path / "no-python")})  # at configure: before any model loads
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU checks, whatever this machine has
    engine = configure({"engine": "vllm", "vllm_server_base_url": "http://127.0.0.1:9"})
    model, tok = build_tiny_llama()  # head size 16: vLLM's CPU attention has no kernel for it
    query, query_mask = left_padded(tok, ["Hi"])
    with pytest.raises(TunelabError, match="no attention kernel for head size 16"):
        engine.sample(model, query, query_mask, max_new_tokens=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    assert not engine.served  # refused before asking the server anything


def test_sampling_settings_in_vllms_names():
    from tunelab.core.vllm_backend import cli_flags, lora_rank, sampling_params

    sampled = sampling_params(24, [2, 7], 0.7, 0, 1.0, True, True, 11, {})
    assert sampled == {"max_tokens": 24, "seed": 11, "stop_token_ids": [2, 7], "skip_special_tokens": False,
                       "include_stop_str_in_output": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "logprobs": 0}
    greedy = sampling_params(8, 2, 0.7, 50, 0.9, False, True, 11, {"repetition_penalty": 1.1})
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"], greedy["repetition_penalty"]) == (0.0, 0, 1.0, 1.1)
    assert "logprobs" not in greedy  # vLLM's greedy log-probs are at temperature 1: none rather than wrong ones
    with pytest.raises(TunelabError, match="generation option num_beams has no vLLM equivalent"):
        sampling_params(8, 2, 1.0, 0, 1.0, True, True, 0, {"num_beams": 2})
    assert cli_flags({"enforce_eager": True, "max_model_len": 512, "quantization": None, "trust_remote_code": False,
                      "compilation_config": {"mode": 0}}) == \
        ["--enforce-eager", "--max-model-len", "512", "--compilation-config", '{"mode": 0}']

    from peft import LoraConfig, get_peft_model

    from tunelab.models import build_tiny_llama

    for r, served in ((4, 8), (8, 8), (12, 16)):  # vLLM's --max-lora-rank takes 1, 8, 16, 32, ...
        model = get_peft_model(build_tiny_llama()[0], LoraConfig(r=r, target_modules="all-linear"))
        assert lora_rank(model) == served


def test_lm_eval_generation_goes_through_the_engine(tiny):
    """eval=lm_eval's generative tasks: with another engine than hf, HFLM samples through tunelab's engine;
    greedy, one context, it gives what lm-eval's own `generate` call gives."""
    from lm_eval.models.huggingface import HFLM

    from tunelab.eval.harness import engine_lm

    model, tok = tiny
    context, _ = left_padded(tok, ["Question: what is 2+2?\nAnswer:"])
    ours = engine_lm()(pretrained=model, tokenizer=tok, backend="causal", batch_size=1, max_length=128)
    theirs = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=1, max_length=128)
    length = context.shape[1] + 5
    assert torch.equal(ours._model_generate(context, length, []), theirs._model_generate(context, length, []))


def test_a_run_with_the_vllm_engine_reaches_it_before_loading_anything(tmp_path):
    """`generation.engine=vllm` is wired into a real run: without vLLM's environment the run stops in one line
    at assembly (tests/test_vllm.py trains GRPO through a real server)."""
    from tests.helpers import run_train

    with pytest.raises(TunelabError, match=r"generation.engine=vllm \(server mode\) needs vLLM's environment at /nonexistent"):
        run_train(tmp_path, "method=grpo", "generation.engine=vllm", "generation.vllm_python=/nonexistent/python")
    assert not (tmp_path / "metrics.json").exists()
