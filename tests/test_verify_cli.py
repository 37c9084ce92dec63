"""`tunelab-verify`: train overrides and verify.* settings on one command line; a table; exit codes."""

from __future__ import annotations

import pytest

from tunelab.cli.verify import main, split_args


pytestmark = pytest.mark.usefixtures("one_thread")


def test_splits_train_overrides_from_verify_settings():
    assert split_args(["adapter=full", "verify.tiny=true", "optimizer.lr=1e-4", "verify.pairs=[seeded]"]) == (
        ["adapter=full", "optimizer.lr=1e-4"], ["tiny=true", "pairs=[seeded]"])


def test_prints_a_table_with_skipped_pairs_and_their_reasons(capsys):
    main(["method=dpo", "adapter=full", "verify.tiny=true", "verify.pairs=[merge,packing]"])
    out = capsys.readouterr().out
    assert "adapter vs merged" in out and "packed vs unpacked" in out
    assert out.count("skip") == 2 and "nothing to merge" in out and "packing is for" in out


@pytest.mark.parametrize("argv, message", [
    (["verify.pairs=[seeded,nope]"], "unknown verify pair(s) nope"),
    (["verify.no_such_setting=1"], "bad verify setting"),
    (["adapter=nope"], "adapter"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify.tiny=true", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_failing_pair_exits_1(capsys):
    # Tolerances are config values: below zero nothing can pass, so the verdict comes from the config.
    with pytest.raises(SystemExit) as exit_info:
        main(["verify.tiny=true", "verify.pairs=[seeded]", "verify.steps=1",
              "verify.tolerance.seeded.loss=-1", "verify.tolerance.seeded.grad_norm=-1"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "1 pair(s) failed: seeded run twice" in captured.err
