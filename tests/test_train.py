"""Training end to end on the tiny model: every combination, overfitting, outputs, export, resume."""

import json
import time

import pytest
import torch
from pytorch_lightning import Callback
from transformers import AutoModelForCausalLM

from tests.helpers import read_metrics, run_train, wandb_records, write_jsonl
from tunelab.errors import TunelabError


@pytest.mark.parametrize("method", ["sft", "pretrain"])
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_every_method_and_adapter_trains(tmp_path, method, adapter):
    overrides = [f"method={method}", f"adapter={adapter}", "trainer.max_steps=3", "trainer.max_epochs=10"]
    if method == "pretrain":
        overrides.append("data=facts_corpus")
    flat = run_train(tmp_path, *overrides)
    metrics = read_metrics(tmp_path)
    assert metrics["train"]["global_step"] == 3
    assert flat["tuned/test/loss"] == pytest.approx(metrics["tuned"]["test/loss"])
    assert (tmp_path / "final").is_dir() and (tmp_path / "resolved_config.yaml").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    trainable = metrics["train"]["trainable_params"]
    assert (trainable == metrics["train"]["total_params"]) == (adapter == "full")


def test_loss_drops_when_overfitting_a_handful_of_examples(tmp_path):
    rows = [{"prompt": f"Say the code {i}.", "completion": f"The code is {i * 7}."} for i in range(4)]
    data = write_jsonl(tmp_path / "tiny.jsonl", rows * 4)
    run = tmp_path / "run"
    run_train(run, f"data.source={data}", "data.val_size=0", "data.test_size=0", "eval.compare_base=false",
              "adapter=full", "optimizer.lr=3e-3", "trainer.max_steps=40", "trainer.max_epochs=100",
              "data.batch_size=4", "scheduler.name=constant", "trainer.log_every_n_steps=1")
    losses = [float(line.split(",")[-1]) for line in (run / "csv" / "metrics.csv").read_text().splitlines()[1:]
              if line.split(",")[-1] and "train/loss" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]]
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    column = header.index("train/loss")
    losses = [float(cells[column]) for cells in
              (line.split(",") for line in (run / "csv" / "metrics.csv").read_text().splitlines()[1:]) if cells[column]]
    assert losses[-1] < 0.3 * losses[0], losses


def test_final_folder_round_trips_and_merge_matches_the_adapter(tmp_path):
    run_train(tmp_path, "adapter=lora", "merge=true", "trainer.max_steps=4", "optimizer.lr=1e-2")
    probe = torch.tensor([[1, 2, 3, 4, 5, 6]])
    adapter = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model").eval()
    with torch.no_grad():
        a, m, b = adapter(probe).logits, merged(probe).logits, base(probe).logits
    assert torch.allclose(a, m, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)  # the adapter really changed something
    # transformers drives the adapter of final/ through PEFT: the pinned pair must support it.
    assert adapter.active_adapters() == ["default"]
    adapter.disable_adapters()
    with torch.no_grad():
        assert torch.allclose(adapter(probe).logits, b, atol=1e-5)
    adapter.enable_adapters()
    assert read_metrics(tmp_path)["train"]["merge_max_logit_gap"] < 1e-3


def test_full_fine_tune_final_folder_loads_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    run_train(tmp_path, "adapter=full", "trainer.max_steps=2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template


class CrashAt(Callback):
    """Simulates a crash (after the step's checkpoint was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def trained_weights(run_dir):
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path):
    # 64 examples / batch 8 = 8 batches per epoch; 12 steps cross an epoch; crash mid-epoch at step 6.
    common = ["adapter=full", "trainer.max_steps=12", "trainer.max_epochs=5", "trainer.precision=32-true",
              "callbacks.checkpoint.every_n_train_steps=3", "eval.compare_base=false", "optimizer.lr=1e-3",
              "scheduler.warmup_steps=2"]
    straight = tmp_path / "straight"
    run_train(straight, *common)

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    import tunelab.run.train as train_module

    original = train_module.build_callbacks
    train_module.build_callbacks = lambda *args: original(*args) + [CrashAt(6)]
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(crashed, *common)
    finally:
        train_module.build_callbacks = original
    assert not (crashed / "metrics.json").exists()
    assert (crashed / "checkpoints" / "last.ckpt").is_file()
    run_train(crashed, *common, "ckpt_path=auto")
    assert read_metrics(crashed)["train"]["global_step"] == 12
    a, b = trained_weights(straight), trained_weights(crashed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_a_finished_run_dir_is_refused_unless_overwrite(tmp_path):
    run_train(tmp_path, "trainer.max_steps=1", "eval.compare_base=false")
    with pytest.raises(TunelabError, match="already holds a finished run"):
        run_train(tmp_path, "trainer.max_steps=1")
    run_train(tmp_path, "trainer.max_steps=1", "overwrite=true", "eval.compare_base=false")


def test_wandb_offline_run_records_config_group_and_job_type(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_train(tmp_path, "logger=wandb", "study=ablation", "tags=[a,b]", "trainer.max_steps=2")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    run_record = None
    for _ in range(60):  # W&B's service process may still be flushing the offline file on a loaded machine
        records = wandb_records(next(runs[0].glob("*.wandb")))
        run_record = next((r.run for r in records if r.WhichOneof("record_type") == "run"), None)
        if run_record is not None:
            break
        time.sleep(0.5)
    assert run_record is not None, "no run record in the offline W&B file"
    assert run_record.run_group == "ablation" and run_record.job_type == "sft"
    assert list(run_record.tags) == ["a", "b"]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["adapter"]["r"] == 8 and config["seed"] == 42


def test_logger_none_runs_with_the_default_callbacks(tmp_path):
    run_train(tmp_path, "logger=none", "trainer.max_steps=2", "eval.compare_base=false", "eval.metrics={}")
    assert read_metrics(tmp_path)["train"]["global_step"] == 2
    assert not (tmp_path / "csv").exists()
