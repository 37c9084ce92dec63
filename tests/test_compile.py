"""runtime.compile: torch.compile of each decoder layer gives the eager loss and gradients, names unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_speed_equivalence import assert_same, batch, loss_and_grads, module, tiny  # noqa: F401 (fixture)
from tunelab.core.runtime import decoder_layers


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_layers_give_the_eager_loss_and_gradients(batch, adapter, backend):  # noqa: F811
    torch._dynamo.reset()
    model = tiny(adapter)
    eager = module(model)
    compiled = module(copy.deepcopy(model), compile=True, compile_backend=backend)
    names = list(compiled.state_dict())
    compiled.levers.apply(compiled, "32-true")  # what fit start does
    layers = decoder_layers(compiled.model)
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert list(compiled.state_dict()) == names  # checkpoints, export and merge see the same keys
    for _ in range(2):  # the second call runs the cached graph
        assert_same(loss_and_grads(eager, batch, False), loss_and_grads(compiled, batch, False), 1e-5, 1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # traced, not run eagerly
    compiled.levers.restore()
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_compile_on_a_model_without_decoder_layers_is_one_clear_error():
    from tunelab.errors import TunelabError

    mod = module(torch.nn.Sequential(torch.nn.Linear(2, 2)), compile=True)
    with pytest.raises(TunelabError, match="no decoder layers found"):
        mod.levers.apply(mod, "32-true")
