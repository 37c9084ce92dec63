"""A tiny random Llama, built locally with a real tokenizer: for tests and `debug=fast`."""

from __future__ import annotations

import torch

from tunelab.models.loading import load_tokenizer


def build_tiny_llama(
    tokenizer: str = "embedded:smollm2-135m-instruct",
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """(model, tokenizer): a randomly initialised LlamaForCausalLM sized by the arguments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation=attn_implementation,
    )
    # A fixed seed of its own, so the tiny model is the same whatever the run's seed does later.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tok
