"""Bad input: one line saying what is wrong and how to fix it, exit 2, no finished-looking run dir."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import write_jsonl

FAST = ["debug=fast", "trainer.enable_progress_bar=false"]


def tunelab_train(tmp_path, *args, timeout=300, env=None):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tunelab.cli.train", *FAST, f"hydra.run.dir={run_dir}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    return result, run_dir


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("override, fragments", [
    ("no_such_option=1", ["no_such_option"]),
    ("adapter=lorax", ["adapter/lorax", "full", "lora"]),
    ("trainer.max_stepz=3", ["max_stepz"]),
])
def test_config_mistakes_are_one_line(tmp_path, override, fragments):
    result, run_dir = tunelab_train(tmp_path, override)
    assert_one_line_error(result, *fragments)
    assert not run_dir.exists()


def bad_data_cases(tmp_path):
    fields = write_jsonl(tmp_path / "fields.jsonl", [{"question": "q", "answer": "a"}] * 20)
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 300, "completion": "x"}] * 20)
    return [
        ([f"data.source={fields}"], ["question, answer", "data.fields"]),
        ([f"data.source={long_prompts}", "data.max_length=32"], ["max_length=32", "raise data.max_length"]),
        (["model=hf", f"model.name_or_path={tmp_path}/no_model"], ["no_model does not exist"]),
    ]


def test_data_and_model_mistakes_are_one_line_and_leave_no_finished_run(tmp_path):
    for args, fragments in bad_data_cases(tmp_path):
        result, run_dir = tunelab_train(tmp_path, *args, "overwrite=true")
        assert_one_line_error(result, *fragments)
        assert not (run_dir / "metrics.json").exists()
        assert (run_dir / "FAILED").is_file()


GOOD = '{"prompt": "a", "completion": "b"}\n'


@pytest.mark.parametrize("content, message", [
    (None, "data file missing.jsonl does not exist; set data.source=PATH to a JSONL/JSON/CSV/Parquet file"),
    (GOOD + '{"prompt": "a" "completion": "b"}\n',
     "data.jsonl:2: malformed JSON (Expecting ',' delimiter at column 16); fix or remove that line"),
    (GOOD + '{"prompt": "a",\n "completion": "b"}\n',
     "data.jsonl:2: malformed JSON (Expecting property name enclosed in double quotes at column 16), the line ends "
     "inside a record (JSON Lines needs each record on one line); fix or remove that line"),
    (GOOD.encode() + '{"prompt": "Qu\'est-ce qu\'un caf\xe9 ?", "completion": "b"}\n'.encode("latin-1"),
     "data.jsonl:2: byte 0xe9 at column 32 is not valid utf-8; set data.encoding to the file's encoding "
     "(e.g. data.encoding=latin-1 or cp1252) or save the file as UTF-8"),
])
def test_an_unreadable_data_file_is_refused_before_a_run_dir_exists(tmp_path, content, message):
    name = "missing.jsonl" if content is None else "data.jsonl"
    if isinstance(content, str):
        (tmp_path / name).write_text(content)
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    result, run_dir = tunelab_train(tmp_path, f"data.source={name}")
    assert error_line(result) == message
    assert not run_dir.exists()


def test_empty_dataset_after_filtering(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result, _ = tunelab_train(tmp_path, f"data.source={empty}")
    assert_one_line_error(result, "holds no records")


def test_help_lists_groups_and_examples():
    out = subprocess.run([sys.executable, "-m", "tunelab.cli.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    assert "adapter: full, lora" in out.stdout and "tunelab-train -m adapter=full,lora" in out.stdout


@pytest.mark.parametrize("trainer, fragment", [("gpu", "no CUDA GPU"), ("cpu trainer.strategy=fsdp", "FSDP1 strategy"),
                                               ("deepspeed", "pip install deepspeed")])
def test_trainers_this_machine_cannot_run_say_so(tmp_path, trainer, fragment):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from tests.helpers import run_train
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match=fragment):
        run_train(tmp_path, *f"trainer={trainer}".split())


def error_line(result) -> str:
    """The one `error: ` line of a refused run, after checking it is the only one and the exit code is 2."""
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0].removeprefix("error: ")


@pytest.mark.parametrize("args, message", [
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001 is not valid: it must be > 0; e.g. optimizer.lr=2e-4"),
    (["adapter.r=0"], "adapter.r=0 is not valid: it must be an integer >= 1 (the LoRA rank); e.g. adapter.r=8"),
    (["adapter.lora_dropout=1.0"], "adapter.lora_dropout=1.0 is not valid: it must be in [0, 1); "
                                   "e.g. adapter.lora_dropout=0.05"),
    (["data.batch_size=0"], "data.batch_size=0 is not valid: it must be an integer >= 1; e.g. data.batch_size=8"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is not valid: it must be an integer "
                                            ">= 1; e.g. trainer.accumulate_grad_batches=4"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is not valid: it must be -1 (no limit) or an integer >= 1 "
                              "(0 trains nothing); e.g. trainer.max_steps=100"),
    (["-m", "optimizer.lr=1e-3,-1"], "optimizer.lr=-1 is not valid: it must be > 0; e.g. optimizer.lr=2e-4"),
    # `???` in the group's config: it ended in omegaconf's MissingMandatoryValue traceback
    (["model=hf"], "model.name_or_path has no value and needs one: add model.name_or_path=VALUE to the command line"),
])
def test_bad_values_are_refused_before_anything_starts(tmp_path, args, message):
    result, run_dir = tunelab_train(tmp_path, *args)
    assert error_line(result) == message
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


ADAMW_OPTIONS = ("lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused")


@pytest.mark.parametrize("override, message", [
    ("+optimizer.lrr=1", f"optimizer has no option 'lrr'; its options are: {ADAMW_OPTIONS}; did you mean optimizer.lr?"),
    ("optimizer.lrr=1", f"optimizer has no option 'lrr'; its options are: {ADAMW_OPTIONS}; did you mean optimizer.lr?"),
    ("+model.run_dir=elsewhere", "model has no option 'run_dir'; its options are: tokenizer, hidden_size, "
     "num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, max_position_embeddings, seed, "
     "attn_implementation"),
    # A real option the config does not set yet: Hydra's advice to add it with + is right.
    ("optimizer.amsgrad=true", "Could not override 'optimizer.amsgrad'. To append to your config use "
     "+optimizer.amsgrad=true"),
])
def test_an_unknown_option_of_a_target_lists_its_options(tmp_path, override, message):
    result, run_dir = tunelab_train(tmp_path, override)
    assert error_line(result) == message
    assert not run_dir.exists()


def test_a_renamed_option_names_its_new_name(tmp_path):
    """PPO's own names before PPO, GRPO and RLOO became one module: an old command gets the new name in one line."""
    from tests.helpers import make_cfg
    from tunelab.config.options import unknown_key_error

    cfg = make_cfg(tmp_path, "method=ppo")
    error = unknown_key_error(cfg, "method.module.kl_coef")
    assert str(error).startswith("method.module.kl_coef is now method.module.beta")
    assert "did you mean" in str(unknown_key_error(cfg, "method.module.betta"))


def test_an_option_a_target_refuses_at_instantiation_names_the_fix():
    """A key no override set (an experiment's, kept after a group switch) fails when the target is called."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tunelab.cli.common import user_error

    cfg = OmegaConf.create({"model": {"_target_": "tunelab.models.load_pretrained", "name_or_path": "x", "run_dir": "y"}})
    with pytest.raises(Exception) as raised:
        instantiate(cfg.model)
    assert str(user_error(raised.value)) == (
        "model has no option 'run_dir'; its options are: name_or_path, dtype, attn_implementation, trust_remote_code, "
        "revision; remove it with '~model.run_dir' (an experiment or an earlier override set it)")


def custom_records(method: str) -> list[dict]:
    """A tiny file of the method's own kind of data, 20 records (16 train, 2 val, 2 test)."""
    numbers = range(20)
    if method == "sft":
        return [{"prompt": f"What comes after {i}?", "completion": f"{i + 1}."} for i in numbers]
    if method == "pretrain":
        return [{"text": f"The number {i + 1} comes right after {i}."} for i in numbers]
    if method == "contrastive":
        return [{"anchor": f"What comes after {i}?", "positive": f"{i + 1} comes after {i}."} for i in numbers]
    return [{"prompt": f"What comes after {i}?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}, I think."}
            for i in numbers]


CUSTOM_RUNS = {  # method: (its quick evaluation settings, a metric only its kind of evaluation writes)
    "sft": (["eval.compare_base=false", "eval.metrics={}"], "test/perplexity"),
    # One row per document (data.packing is off for data=custom), at most max_length tokens: several batches.
    "pretrain": (["eval.compare_base=false", "eval.metrics={}", "data.max_length=16"], "test/perplexity"),
    "dpo": (["method.evaluator.compare_base=false"], "test/margin"),
    "reward": (["method.evaluator.compare_base=false"], "test/margin"),
    "contrastive": (["method.evaluator.compare_base=false"], "test/accuracy_at_1"),
}


# pretrain and reward read the same kinds as sft and dpo: under -m slow.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in ("pretrain", "reward") else m
                                    for m in sorted(CUSTOM_RUNS)])
def test_data_custom_reads_a_file_of_the_methods_own_kind(tmp_path, method):
    """`data=custom` means "my file, for this method's kind of data": preference pairs under dpo/reward,
    text pairs under contrastive, raw text under pretrain (it used to be read as sft data for every method)."""
    write_jsonl(tmp_path / "mine.jsonl", custom_records(method))
    settings, metric = CUSTOM_RUNS[method]
    result, run_dir = tunelab_train(tmp_path, f"method={method}", "data=custom", "data.source=mine.jsonl",
                                    "data.batch_size=4", "trainer.max_steps=2", "trainer.precision=32-true", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 2 and metric in metrics["tuned"]


def test_data_custom_without_a_source_says_so(tmp_path):
    """`source: ???` in custom.yaml would have kept the shipped file of the config it extends."""
    result, run_dir = tunelab_train(tmp_path, "method=dpo", "data=custom")
    assert error_line(result) == ("data.source is not set: data=custom reads your own file, give it with "
                                  "data.source=PATH (.jsonl, .json, .csv, .parquet or .txt)")
    assert not run_dir.exists()


# Nothing listens on the discard port of this machine: a connection there is refused at once, with no network.
CLOSED_ENDPOINT = "http://127.0.0.1:9"


def hub_env(tmp_path, **variables) -> dict:
    """The environment with an empty HF cache, none of the offline switches conftest sets, plus `variables`."""
    from tunelab.models.hub import OFFLINE_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    return env | {"HF_HOME": str(tmp_path / "hf_home")} | variables


@pytest.fixture(scope="module")
def refusal_seconds(tmp_path_factory):
    """How long a refusal at preflight takes on this machine (interpreter start and imports included)."""
    started = time.perf_counter()
    result, _ = tunelab_train(tmp_path_factory.mktemp("baseline"), "optimizer.lr=-1")
    assert result.returncode == 2
    return time.perf_counter() - started


@pytest.mark.parametrize("variables, why", [
    ({"HF_ENDPOINT": CLOSED_ENDPOINT}, f"{CLOSED_ENDPOINT} did not answer within 3 s"),
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
])
@pytest.mark.parametrize("args, named", [
    (["model=hf", "model.name_or_path=nobody/no-such-model"],
     "model.name_or_path=nobody/no-such-model looks like a Hugging Face hub model id"),
    (["data.source=nobody/no-such-data"], "data.source=nobody/no-such-data looks like a Hugging Face hub dataset id"),
])
def test_a_hub_name_while_offline_is_refused_in_seconds(tmp_path, refusal_seconds, variables, why, args, named):
    """The libraries alone retried for 35-57 s before their own error."""
    from tunelab.models.hub import REACHABLE_TIMEOUT_S

    started = time.perf_counter()
    result, run_dir = tunelab_train(tmp_path, *args, env=hub_env(tmp_path, **variables))
    seconds = time.perf_counter() - started
    key = args[-1].split("=")[0]
    local = "folder" if key.startswith("model") else "file"
    assert error_line(result) == (f"{named}, but the hub is unreachable ({why}) and no copy is cached; "
                                  f"give a local {local}: {key}=PATH")
    # Not a speed target: the libraries' own retries added 35-57 s over a plain refusal, ours one probe of
    # REACHABLE_TIMEOUT_S; the margin between is wide enough for a loaded machine.
    assert seconds - refusal_seconds < REACHABLE_TIMEOUT_S + 25, (seconds, refusal_seconds)
    assert not run_dir.exists()


def test_a_cached_hub_model_still_loads_when_the_hub_is_unreachable(tmp_path):
    """Offline mode is switched on for the libraries (after they were imported), so the cached copy loads."""
    from tunelab.models import build_tiny_llama

    repo = tmp_path / "hf_home" / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    model, tokenizer = build_tiny_llama()
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    result, run_dir = tunelab_train(tmp_path, "model=hf", "model.name_or_path=someone/tiny", "trainer.max_steps=1",
                                    "trainer.precision=32-true", "eval.compare_base=false", "eval.metrics={}",
                                    env=hub_env(tmp_path, HF_ENDPOINT=CLOSED_ENDPOINT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["global_step"] == 1


def test_max_steps_wins_over_the_default_max_epochs(tmp_path):
    """16 examples at batch 8 are 2 steps an epoch: max_epochs: 1 used to stop trainer.max_steps=12 at step 2."""
    result, run_dir = tunelab_train(tmp_path, "trainer.max_steps=12", "data.max_train_examples=16",
                                    "trainer.precision=32-true", "eval.compare_base=false", "eval.metrics={}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["global_step"] == 12
    assert "max_epochs: -1" in (run_dir / "resolved_config.yaml").read_text()  # what ran is what is saved
