"""The speed levers change how the loss is computed, never what it is: same loss, same gradients.

Each check compares the optimised path with the plain one on a tiny random Llama and real
tokenized SFT batches (prompt tokens masked), in fp32 (tight) and under bf16 autocast (bf16 tolerance).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from tunelab.core.losses import backbone_and_head, token_loss_sum
from tunelab.core.runtime import apply_runtime
from tunelab.data.batching import Collator
from tunelab.data.formats import normalize
from tunelab.data.templates import PromptFormatter
from tunelab.data.tokenize import SupervisedTokenizer
from tunelab.methods.base import CausalLMModule
from tunelab.models.tiny import build_tiny_llama

RECORDS = [
    {"instruction": "Give the capital of this country.", "input": "Mozambique", "output": "The capital is Maputo."},
    {"instruction": "Sort these words alphabetically.", "input": "cheese shoe morning jacket moon",
     "output": "cheese, jacket, moon, morning, shoe"},
    {"instruction": "Write the number in words.", "input": "8509", "output": "eight thousand five hundred nine"},
    {"instruction": "What is the antonym of known?", "output": "unknown"},
]


@pytest.fixture(scope="module")
def batch(tokenizer):
    """A right-padded batch of different lengths whose labels mask the prompts."""
    rows, _ = SupervisedTokenizer()(normalize(RECORDS, "auto", {}, None), PromptFormatter(tokenizer, "chat"), 128)
    return Collator(tokenizer.pad_token_id)(rows)


def tiny(adapter: str = "full", **config):
    model, _ = build_tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128, seed=1)
    for key, value in config.items():
        setattr(model.config, key, value)
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))  # non-zero B: LoRA grads are non-trivial
    return model


def module(model, head_on_supervised_only: bool = True, **runtime) -> CausalLMModule:
    """The SFT module with the runtime group's knobs applied, as the assembler applies them."""
    mod = CausalLMModule(model, functools.partial(torch.optim.AdamW, lr=1e-3),
                         head_on_supervised_only=head_on_supervised_only)
    apply_runtime(mod, runtime)
    return mod


def loss_and_grads(mod: CausalLMModule, batch: dict, bf16: bool):
    mod.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss_sum, tokens = mod.loss_sum(batch)
    (loss_sum / tokens).backward()
    grads = {n: p.grad.detach().clone() for n, p in mod.named_parameters() if p.requires_grad}
    return loss_sum.detach(), int(tokens), grads


def assert_same(plain, fast, rtol: float, grad_tol: float):
    (loss_a, tokens_a, grads_a), (loss_b, tokens_b, grads_b) = plain, fast
    assert tokens_a == tokens_b > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        # Relative to the tensor's own scale: bf16 rounding differs with the order of operations.
        gap = (grads_b[name] - grad).norm() / grad.norm()
        assert gap < grad_tol, f"{name}: relative gradient gap {gap:.2e}"


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_head_on_supervised_positions_matches_full_logits(batch, adapter, bf16):
    model = tiny(adapter)
    plain = module(model, head_on_supervised_only=False)
    fast = module(copy.deepcopy(model), head_on_supervised_only=True)
    assert plain.split is None and fast.split is not None
    assert int((batch["labels"][:, 1:] != -100).sum()) < int(batch["attention_mask"].sum()) / 2  # prompts dominate
    # The plain path is the evaluator's token_loss_sum over the full logits.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(plain.loss_sum(batch)[0], token_loss_sum(logits, batch["labels"])[0])
    tol = (1e-2, 3e-2) if bf16 else (1e-5, 1e-4)
    assert_same(loss_and_grads(plain, batch, bf16), loss_and_grads(fast, batch, bf16), *tol)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch):
    model = tiny("lora")
    plain = module(model)
    checkpointed = module(copy.deepcopy(model), gradient_checkpointing=True)
    assert checkpointed.model.base_model.model.model.gradient_checkpointing
    assert_same(loss_and_grads(plain, batch, False), loss_and_grads(checkpointed, batch, False), 1e-6, 1e-5)


def test_models_the_split_cannot_express_fall_back_to_the_plain_path(batch):
    from peft import PromptTuningConfig, get_peft_model

    capped = tiny(final_logit_softcapping=30.0)
    assert backbone_and_head(capped) is None
    assert module(capped).split is None
    prompt_tuned = get_peft_model(tiny(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert backbone_and_head(prompt_tuned) is None
    assert backbone_and_head(tiny("lora")) is not None


def test_fused_adamw_takes_the_same_steps_as_foreach(batch):
    """optimizer.fused=true (one kernel per step) moves the weights exactly like the foreach default."""
    weights = []
    for kind in ({"foreach": True}, {"fused": True}):
        mod = CausalLMModule(tiny(), functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, **kind))
        optimizer = mod.optimizer_factory(mod.optimizer_parameters())
        for _ in range(3):
            optimizer.zero_grad()
            loss_sum, tokens = mod.loss_sum(batch)
            (loss_sum / tokens).backward()
            optimizer.step()
        weights.append(torch.cat([p.detach().flatten() for p in mod.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_frozen_weights_stored_in_bf16_give_the_same_loss_and_gradients(batch):
    """frozen_weights_dtype: the bf16 copy autocast makes of a frozen weight, stored: the same math."""
    from tunelab.core.runtime import LowPrecisionFrozenWeights

    model = tiny("lora")
    plain = module(model, frozen_weights_dtype=None)
    fast = module(copy.deepcopy(model), frozen_weights_dtype="auto")
    lowered = LowPrecisionFrozenWeights(fast.model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in fast.model.named_parameters()}
    assert {dtypes[n] for n in dtypes if "base_layer" in n} == {torch.bfloat16}
    assert {dtypes[n] for n in dtypes if "lora_" in n or "norm" in n or "embed_tokens" in n} == {torch.float32}
    # Under bf16 autocast the stored copy is exactly what autocast computes with.
    assert_same(loss_and_grads(plain, batch, True), loss_and_grads(fast, batch, True), 1e-6, 1e-5)
    # Outside autocast the layers still run (input cast to bf16, output back), within bf16 tolerance.
    assert_same(loss_and_grads(plain, batch, False), loss_and_grads(fast, batch, False), 1e-2, 3e-2)
    lowered.restore()
    assert {p.dtype for p in fast.parameters()} == {torch.float32}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in fast.model.modules())


def test_frozen_weights_dtype_follows_the_precision():
    from tunelab.core.runtime import frozen_weights_dtype_for
    from tunelab.errors import TunelabError

    assert frozen_weights_dtype_for("auto", "bf16-mixed") is torch.bfloat16
    assert frozen_weights_dtype_for("auto", "32-true") is None
    assert frozen_weights_dtype_for(None, "bf16-mixed") is None
    with pytest.raises(TunelabError, match="bf16-mixed"):
        frozen_weights_dtype_for("bfloat16", "32-true")


def test_lightning_trains_in_training_mode_with_the_levers_on(batch, tmp_path):
    """A from_pretrained model arrives in eval mode; Lightning keeps it so unless the module switches
    it: then gradient checkpointing (which acts in training mode only) would silently do nothing."""
    import pytorch_lightning as pl

    model = tiny("lora").eval()
    mod = module(model, gradient_checkpointing=True)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            layer = pl_module.model.base_model.model.model.layers[0]
            seen.append((layer.training, layer.gradient_checkpointing, layer.self_attn.q_proj.base_layer.weight.dtype))

    steps = [{**batch, "step_tokens": (batch["labels"][:, 1:] != -100).sum().float()}] * 2
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, callbacks=[Spy()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(mod, train_dataloaders=torch.utils.data.DataLoader(steps, batch_size=None))
    assert seen == [(True, True, torch.bfloat16)] * 2
    assert {p.dtype for p in mod.parameters()} == {torch.float32}  # restored after fit


def saved_bytes(mod: CausalLMModule, batch: dict) -> int:
    """Bytes autograd keeps for backward in one bf16 forward of the decoder stack (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone_and_head(mod.model)[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sum(storages.values())


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_casting_block_inputs_once_gives_the_same_loss_and_gradients(batch, adapter):
    from tunelab.core.runtime import CastInputsOnce

    model = tiny(adapter)
    plain = module(model, cast_inputs_once=False)
    fast = module(copy.deepcopy(model))
    before = saved_bytes(fast, batch)
    once = CastInputsOnce(fast.model)
    assert len(once.hooks) == 2 * 2  # attention and MLP of both layers
    # Same forward values (one cast instead of several identical ones); gradients summed in bf16.
    assert_same(loss_and_grads(plain, batch, True), loss_and_grads(fast, batch, True), 1e-6, 3e-2)
    assert saved_bytes(fast, batch) < 0.95 * before  # fewer copies kept for backward
    # Outside autocast nothing changes.
    assert_same(loss_and_grads(plain, batch, False), loss_and_grads(fast, batch, False), 1e-6, 1e-5)
    once.restore()
    assert saved_bytes(fast, batch) == before
