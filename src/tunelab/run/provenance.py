"""Run provenance: `provenance.json` in every run dir, the fidelity gate on tokenizer/template, and
`tunelab-train reproduce=RUN_DIR`.

The manifest holds what it takes to re-run a run and to tell whether anything differs: the resolved
config and command-line overrides, the code (git commit and uncommitted diff), package versions,
hardware, the seed, and content hashes of the data, tokenizer and template."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.data.fingerprints import chat_template_fingerprint, template_fingerprint, tokenizer_fingerprint
from tunelab.errors import TunelabError
from tunelab.paths import REPO_DIR
from tunelab.run.rundir import rank_zero_only

MANIFEST = "provenance.json"
PACKAGES = ("tunelab", "torch", "transformers", "tokenizers", "peft", "pytorch-lightning", "datasets",
            "hydra-core", "omegaconf", "trl", "accelerate", "numpy")
MAX_DIFF_CHARS = 1_000_000  # a huge uncommitted diff is cut, and the cut is recorded
# Metrics that measure the machine, not the model: left out of a reproduction's comparison.
NOT_REPRODUCIBLE = ("seconds", "memory", "per_second", "throughput", "time")


def git_state(repo: Path = REPO_DIR) -> dict | None:
    """Commit, dirty flag and uncommitted diff of the code that ran; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return None
    diff = git("diff", "HEAD")
    untracked = [p for p in git("ls-files", "--others", "--exclude-standard").splitlines() if p]
    return {"commit": commit, "dirty": bool(diff or untracked), "diff": diff[:MAX_DIFF_CHARS],
            "diff_truncated": len(diff) > MAX_DIFF_CHARS, "untracked": untracked}


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without Hydra's runtime (tests, tunelab-verify)
        return []


def tokenizer_hashes(tokenizer, template: str) -> dict[str, str]:
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "chat_template": chat_template_fingerprint(tokenizer),
            "template": template_fingerprint(tokenizer, template)}


def build_manifest(cfg: DictConfig, tokenizer, datamodule) -> dict:
    template = getattr(getattr(datamodule, "formatter", None), "template", cfg.data.get("template", "chat"))
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "overrides": hydra_overrides(),
        "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git": git_state(),
        "packages": package_versions(),
        "hardware": hardware(),
        "data": {"source": str(cfg.data.get("source")), **getattr(datamodule, "fingerprints", {})},
        "fidelity": {**tokenizer_hashes(tokenizer, template), "template_setting": template},
    }


@rank_zero_only
def write_manifest(cfg: DictConfig, run_dir: Path, tokenizer, datamodule, resuming: bool = False) -> Path | None:
    """provenance.json (rank 0 writes it); a resume keeps the original record and adds when and how it was resumed."""
    path = Path(run_dir) / MANIFEST
    manifest = build_manifest(cfg, tokenizer, datamodule)
    if resuming and path.is_file():
        original = json.loads(path.read_text())
        resumes = original.get("resumed", []) + [{k: manifest[k] for k in ("created", "command", "git")}]
        manifest = {**original, "resumed": resumes}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise TunelabError(f"run dir {run_dir} does not exist; give the folder of a tunelab-train run")
    if not path.is_file():
        raise TunelabError(f"{run_dir} has no {MANIFEST}: it was not written by tunelab-train (or by an older "
                           "version); re-run it with tunelab-train to get a manifest")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TunelabError(f"{path} is not valid JSON ({err.msg}); the manifest is damaged") from None


# --- the fidelity gate -------------------------------------------------------------------------

def check_fidelity(run_dir: Path, tokenizer, template: str = "chat", allow_mismatch: bool = False) -> list[str]:
    """Refuse a tokenizer or template that differs from the one the run trained with.

    Returns the differences (empty when all match); raises unless allow_mismatch, in which case the
    caller is expected to warn."""
    recorded = read_manifest(run_dir).get("fidelity") or {}
    current = tokenizer_hashes(tokenizer, template)
    differ = [name for name in ("tokenizer", "template") if recorded.get(name) and recorded[name] != current[name]]
    if differ and not allow_mismatch:
        what = " and ".join("the tokenizer" if d == "tokenizer" else f"the template ({template!r})" for d in differ)
        raise TunelabError(
            f"{what} differ(s) from what {run_dir} was trained with (trained with template "
            f"{recorded.get('template_setting')!r}); use the run's own tokenizer and template, or pass "
            "allow_template_mismatch=true (tunelab-chat: --allow-template-mismatch) to use them anyway"
        )
    return differ


# --- reproduce=RUN_DIR --------------------------------------------------------------------------

def reproduce_overrides(run_dir: Path, new_dir: Path, extra: list[str]) -> list[str]:
    """The recorded overrides, pointed at a fresh run dir, with the user's extra overrides last."""
    manifest = read_manifest(run_dir)
    kept = [o for o in manifest.get("overrides", []) if not o.split("=", 1)[0].lstrip("+~").startswith("hydra.run.dir")]
    kept = [o for o in kept if not o.startswith(("ckpt_path=", "overwrite="))]
    return [*kept, f"hydra.run.dir={new_dir}", *extra]


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_numbers(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def compare_metrics(original: dict, again: dict, rtol: float) -> list[dict]:
    """One row per comparable metric: both values, the relative gap and whether it is within rtol."""
    a, b = flat_numbers(original), flat_numbers(again)
    rows = []
    for name in sorted(a.keys() | b.keys()):
        if any(word in name for word in NOT_REPRODUCIBLE):
            continue
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            rows.append({"metric": name, "original": x, "reproduced": y, "gap": math.inf, "match": False})
            continue
        gap = abs(x - y) / max(abs(x), abs(y), 1e-12) if not (math.isnan(x) and math.isnan(y)) else 0.0
        rows.append({"metric": name, "original": x, "reproduced": y, "gap": gap, "match": gap <= rtol})
    return rows


def print_reproduction(rows: list[dict], original: Path, again: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reproduce: {original} vs {again}")
    for column in ("metric", "original", "reproduced", "relative gap", "match"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["metric"], f"{r['original']:.6g}" if r["original"] is not None else "-",
                      f"{r['reproduced']:.6g}" if r["reproduced"] is not None else "-", f"{r['gap']:.2e}",
                      "[green]yes[/]" if r["match"] else "[bold red]NO[/]")
    Console().print(table)


def take_reproduce_arg(argv: list[str]) -> tuple[Path, Path] | None:
    """`reproduce=RUN_DIR` in argv: rewrite argv (in place) into the recorded run's overrides aimed at a
    fresh dir, RUN_DIR/reproduce/TIME unless the user gives hydra.run.dir; return (RUN_DIR, new dir)."""
    found = [a for a in argv[1:] if a.startswith("reproduce=")]
    if not found:
        return None
    original = Path(found[-1].split("=", 1)[1]).expanduser()
    extra = [a for a in argv[1:] if not a.startswith("reproduce=")]
    read_manifest(original)
    if not (original / "metrics.json").is_file():
        raise TunelabError(f"{original} holds no metrics.json (the run did not finish); there is nothing to compare")
    chosen = [a.split("=", 1)[1] for a in extra if a.startswith("hydra.run.dir=")]
    new_dir = Path(chosen[-1]) if chosen else original / "reproduce" / time.strftime("%Y-%m-%d_%H-%M-%S")
    argv[1:] = reproduce_overrides(original, new_dir, [a for a in extra if not a.startswith("hydra.run.dir=")])
    return original, new_dir


def report_reproduction(original: Path, again: Path) -> bool:
    """Compare the two runs' metrics.json, print the table; True when every metric matches."""
    if not (again / "metrics.json").is_file():
        raise TunelabError(f"the reproduction in {again} did not finish (no metrics.json); see its FAILED file")
    rtol = float(OmegaConf.load(again / "resolved_config.yaml").get("reproduce_rtol", 0.0))
    rows = compare_metrics(json.loads((original / "metrics.json").read_text()),
                           json.loads((again / "metrics.json").read_text()), rtol)
    print_reproduction(rows, original, again)
    differ = [r["metric"] for r in rows if not r["match"]]
    if differ:
        print(f"reproduce: {len(differ)} of {len(rows)} metrics differ by more than reproduce_rtol={rtol}: "
              f"{', '.join(differ[:8])}", file=sys.stderr)
    else:
        print(f"reproduce: all {len(rows)} metrics match within reproduce_rtol={rtol}")
    return not differ


def gate_target(model_path: str, tokenizer, template: str, allow_mismatch: bool = False) -> list[str]:
    """The fidelity gate for tools pointed at a trained model (evaluate, chat): check the tokenizer and
    template against the run's manifest; a folder with no run manifest above it is not checked."""
    folder = Path(str(model_path)).expanduser()
    for candidate in (folder, folder.parent):
        if (candidate / MANIFEST).is_file():
            differ = check_fidelity(candidate, tokenizer, template, allow_mismatch)
            if differ:
                import logging

                logging.getLogger(__name__).warning(
                    "%s differ(s) from what %s trained with (allowed by allow_template_mismatch)", ", ".join(differ), candidate)
            return differ
    return []
