"""Bad input: one line saying what is wrong and how to fix it, exit 2, no finished-looking run dir."""

import subprocess
import sys

import pytest

from tests.helpers import write_jsonl

FAST = ["debug=fast", "trainer.enable_progress_bar=false"]


def tunelab_train(tmp_path, *args, timeout=300):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tunelab.cli.train", *FAST, f"hydra.run.dir={run_dir}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
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
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    fields = write_jsonl(tmp_path / "fields.jsonl", [{"question": "q", "answer": "a"}] * 20)
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 300, "completion": "x"}] * 20)
    return [
        ([f"data.source={tmp_path}/missing.jsonl"], ["missing.jsonl does not exist"]),
        ([f"data.source={malformed}"], ["malformed.jsonl:2: malformed JSON"]),
        ([f"data.source={fields}"], ["question, answer", "data.fields"]),
        ([f"data.source={long_prompts}", "data.max_length=32"], ["max_length=32", "raise data.max_length"]),
        (["model=hf", f"model.name_or_path={tmp_path}/no_model"], ["no_model does not exist"]),
        (["+model.run_dir=elsewhere"], ["model.run_dir is not an option", "'~model.run_dir'"]),
    ]


def test_data_and_model_mistakes_are_one_line_and_leave_no_finished_run(tmp_path):
    for args, fragments in bad_data_cases(tmp_path):
        result, run_dir = tunelab_train(tmp_path, *args, "overwrite=true")
        assert_one_line_error(result, *fragments)
        assert not (run_dir / "metrics.json").exists()
        assert (run_dir / "FAILED").is_file()


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
