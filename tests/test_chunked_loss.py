"""runtime.chunked_loss: the LM head over a few tokens at a time gives the plain path's loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.test_speed_equivalence import assert_same, batch, loss_and_grads, module, tiny  # noqa: F401 (fixture)
from tunelab.core.losses import CHUNK_ATTRIBUTE, chunked_nll_sum, chunked_token_logprobs


def head_and_hidden(bias: bool = False, rows: int = 37, width: int = 16, vocab: int = 50):
    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=bias)
    return head, torch.randn(rows, width, requires_grad=True), torch.randint(0, vocab, (rows,))


def grads_of(value: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, tensors))


@pytest.mark.parametrize("bias", [False, True], ids=["fused", "checkpointed"])  # a biased head takes the general path
def test_chunked_nll_sum_matches_cross_entropy_and_its_gradients(bias):
    head, hidden, targets = head_and_hidden(bias)
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    chunked = chunked_nll_sum(hidden, head, targets, chunk_size=8)  # 37 rows: 4 full chunks and a partial one
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads_of(3 * plain, hidden, head.weight), grads_of(3 * chunked, hidden, head.weight)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["fused", "checkpointed"])
def test_chunked_token_logprobs_match_log_softmax_under_any_upstream_gradient(bias):
    head, hidden, targets = head_and_hidden(bias)
    upstream = torch.randn(len(targets))  # per-token weights, as a DPO or policy-gradient loss gives
    plain = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    chunked = chunked_token_logprobs(hidden, head, targets, chunk_size=8)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_of((plain * upstream).sum(), hidden, head.weight),
                    grads_of((chunked * upstream).sum(), hidden, head.weight)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_no_gradient_buffers_without_grad_and_a_frozen_head_gets_none():
    head, hidden, targets = head_and_hidden()
    with torch.no_grad():
        assert not chunked_nll_sum(hidden, head, targets, 8).requires_grad
    head.weight.requires_grad_(False)
    chunked_nll_sum(hidden, head, targets, 8).backward()
    assert head.weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_sft_loss_with_the_chunked_head_matches_the_plain_head(batch, adapter, bf16):  # noqa: F811
    model = tiny(adapter)
    plain = module(model)
    chunked = module(copy.deepcopy(model), chunked_loss=True, loss_chunk_size=7)
    chunked.levers.apply(chunked, "bf16-mixed" if bf16 else "32-true")  # what fit start does
    assert getattr(chunked.model, CHUNK_ATTRIBUTE) == 7
    tol = (1e-2, 3e-2) if bf16 else (1e-5, 1e-4)
    assert_same(loss_and_grads(plain, batch, bf16), loss_and_grads(chunked, batch, bf16), *tol)
    chunked.levers.restore()
    assert not hasattr(chunked.model, CHUNK_ATTRIBUTE)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_preference_log_probs_with_the_chunked_head_match(batch, adapter):  # noqa: F811
    """completion_logps (DPO, KTO, ORPO, SimPO/CPO) and token_logps (for the on-policy methods) through the chunks."""
    from tunelab.core.logprobs import completion_logps, token_logps

    model = tiny(adapter)
    chunked = copy.deepcopy(model)
    setattr(chunked, CHUNK_ATTRIBUTE, 5)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a different upstream gradient per row, as a DPO margin gives
    results = []
    for m in (model, chunked):
        m.zero_grad(set_to_none=True)
        logps, tokens = completion_logps(m, *inputs)
        (logps * weights).sum().backward()
        grads = [p.grad.clone() for p in m.parameters() if p.requires_grad]
        results.append((logps.detach(), tokens, grads, token_logps(m, *inputs, temperature=0.7)[0].detach()))
    (logps_a, tokens_a, grads_a, scaled_a), (logps_b, tokens_b, grads_b, scaled_b) = results
    assert torch.equal(tokens_a, tokens_b) and (tokens_a > 0).all()
    torch.testing.assert_close(logps_b, logps_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled_b, scaled_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert (b - a).norm() <= 1e-4 * a.norm()


def test_a_chunk_size_below_one_is_one_clear_error():
    from tunelab.errors import TunelabError

    mod = module(tiny(), chunked_loss=True, loss_chunk_size=0)
    with pytest.raises(TunelabError, match="runtime.loss_chunk_size must be a positive number"):
        mod.levers.apply(mod, "32-true")
