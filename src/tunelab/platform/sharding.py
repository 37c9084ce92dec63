"""`trainer=fsdp`: fully sharded data parallelism (FSDP2, `fully_shard`) on GPUs (nccl) or CPU processes (gloo).

Why not Lightning's own `FSDPStrategy` (FSDP1): with accelerator=cpu Lightning refuses it ("The strategy
`fsdp` requires a GPU accelerator"), and a subclass that gets past that check fails in torch, since Lightning
passes `device_id=None` on CPU ("FSDP needs a non-CPU accelerator device, but no accelerator device is
detected"; FSDP1 itself runs on CPU only when given `device_id=cpu`). FSDP2 has no such limit. So this is
Lightning's `ModelParallelStrategy` (FSDP2) with every process one data-parallel shard, and the sharding
done here: each transformer block is its own unit and the LightningModule is the root unit (embeddings,
head, norms, any extra head), entered through forward redirection as Lightning's FSDP1 strategy does, so a
method may call its backbone and head separately (the split loss path, reward and contrastive heads).

Checkpoints hold the full trainable weights, written by rank 0 (what `on_save_checkpoint` keeps under every
strategy); after training, `full_model()` gathers the full weights into a plain copy of the network on
rank 0 for evaluation and `final/`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the repeated blocks a HF model declares unsplittable (e.g. LlamaDecoderLayer)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory); buffers are real copies."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shared_parameter_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of names that are one parameter (tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def load_full_weights(skeleton: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`skeleton` holding the tensors of `state` (a full state dict), its tied parameters one parameter again."""
    tied = shared_parameter_names(skeleton)
    # The dtypes it had before training (the frozen-weight lever may have changed them on the sharded copy).
    expected = skeleton.state_dict(keep_vars=True)
    state = {k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    for names in tied:
        loaded = [name for name in names if name in state]
        if loaded:
            source = skeleton.get_parameter(loaded[0])
            for name in names:
                owner, _, attr = name.rpartition(".")
                setattr(skeleton.get_submodule(owner), attr, source)
            missing = [k for k in missing if k not in names]
    if missing or unexpected:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return skeleton


def uses_fsdp(trainer_cfg) -> bool:
    strategy = trainer_cfg.get("strategy")
    return hasattr(strategy, "get") and str(strategy.get("_target_", "")).endswith("sharding.FSDPStrategy")


def check_shardable(trainer_cfg, module, callbacks: list) -> None:
    """Refuse, before anything slow, what would hang or train wrong under trainer=fsdp.

    Each of these runs the network outside the root unit's forward (so its root weights stay sharded) or on
    one rank alone (so the others never join the weight gathers)."""
    if not uses_fsdp(trainer_cfg):
        return
    if not module.automatic_optimization:
        raise TunelabError("trainer=fsdp cannot run this method: it steps by hand with backward inside its "
                           "training_step and generates rollouts of uneven length per rank, so FSDP would neither "
                           "reduce its root gradients nor keep the ranks' weight gathers in step; use trainer=ddp")
    if getattr(module, "precompute_ref_logps", False):
        raise TunelabError("trainer=fsdp cannot precompute reference log-probs (that pass runs outside the "
                           "sharded training step); set method.module.precompute_ref_logps=false or use trainer=ddp")
    if callbacks:
        raise TunelabError("trainer=fsdp cannot generate during training (rank 0 generates alone, the others "
                           "hold the other shards); set eval.during_training.every_n_epochs=0 or use trainer=ddp")


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every process, on whatever accelerator Lightning chose (gloo on CPU)."""

    strategy_name = "tunelab_fsdp"

    def __init__(self, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self._skeleton: torch.nn.Module | None = None

    def setup_environment(self) -> None:
        # Lightning's "auto" makes the processes of a node tensor-parallel; here each one is a data shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        # Taken before the module's setup hooks change the network for training (frozen-weight dtype, casts).
        self._skeleton = meta_skeleton(self.lightning_module.model)

    def shard(self, module: torch.nn.Module) -> None:
        """Called from the LightningModule's `configure_model`: blocks first, then the module as root."""
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        names = block_classes(module)
        blocks = [sub for sub in module.modules() if type(sub).__name__ in names]
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=False)
        local = sum(p.to_local().numel() for p in module.parameters())
        total = sum(p.numel() for p in module.parameters())
        log.info("fsdp: %d blocks (%s) and the root sharded over %d processes: %d of %d parameters on this one",
                 len(blocks), ", ".join(sorted(names)) or "none", mesh.size(), local, total)

    # Every step enters the root unit's forward, which gathers its parameters and, after backward, reduces them.
    def training_step(self, *args: Any, **kwargs: Any):
        with self.precision_plugin.train_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any):
        with self.precision_plugin.val_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any):
        with self.precision_plugin.test_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any):
        with self.precision_plugin.predict_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "predict_step", *args, **kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Frozen weights are never checkpointed (LanguageModelModule.on_save_checkpoint), so not gathered either.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def full_model(self) -> torch.nn.Module | None:
        """The trained network with its full weights, as a plain (unsharded) module on rank 0; None elsewhere.

        Every rank must call it: the weights are gathered from all of them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.lightning_module.model, options=options)
        if self.global_rank != 0:
            return None
        model = load_full_weights(self._skeleton, state)
        self._skeleton = None
        return model.to(self.root_device)


def full_model(trainer, model: torch.nn.Module) -> torch.nn.Module | None:
    """`model` as trained, whole: itself, or under trainer=fsdp its gathered weights (None off rank 0)."""
    strategy = trainer.strategy
    return strategy.full_model() if isinstance(strategy, FSDPStrategy) else model
