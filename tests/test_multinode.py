"""`trainer.num_nodes`: 2 nodes x 1 process, launched as a cluster launches them (torchrun on each node, here two
torchrun launches on this machine, static rendezvous over loopback, gloo), train as 1 process does at the same global
batch: the same steps, the same losses. As far as one machine can prove multi-node training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster import free_port
from tests.helpers import FAST, read_metrics, run_train
from tests.test_ddp import SAME_RUN
from tunelab.paths import REPO_DIR


def launch_node(rank: int, port: int, run_dir: Path, *overrides: str) -> subprocess.Popen:
    """One node's torchrun (1 process); both nodes write to one run dir, as on a shared file system (Hydra's own
    files of node 1 go to their own subdir)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                "--master-addr=127.0.0.1", f"--master-port={port}"]
    own = [f"hydra.output_subdir=.hydra_node{rank}"] if rank else []
    cmd = [*torchrun, "-m", "tunelab.cli.train", *FAST, "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1",
           *overrides, f"hydra.run.dir={run_dir}", *own]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(REPO_DIR / "src")]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ~40 s on 2 cores (three trainings): `make test-cluster` runs it; the default run keeps the same equivalence for
# 2 processes on one node (test_ddp), which runs the same DDP code path with one node.
@pytest.mark.slow
@pytest.mark.cluster
def test_two_nodes_of_one_process_at_the_same_global_batch_match_one_process(tmp_path):
    run_dir, port = tmp_path / "two_nodes", free_port()
    nodes = [launch_node(rank, port, run_dir, "data.batch_size=4", *SAME_RUN) for rank in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    (tmp_path / "node0.out").write_text(outputs[0]), (tmp_path / "node1.out").write_text(outputs[1])
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1]         # one process on each node
    assert yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["trainer"]["num_nodes"] == 2
    nodes_result = read_metrics(run_dir)

    single_dir = tmp_path / "single"
    run_train(single_dir, "data.batch_size=8", *SAME_RUN)
    single = read_metrics(single_dir)
    assert nodes_result["train"]["global_step"] == single["train"]["global_step"] == 8   # 64 examples / global batch 8
    assert nodes_result["tuned"]["test/loss"] == pytest.approx(single["tuned"]["test/loss"], rel=1e-4)
    assert nodes_result["train"]["val/loss"] == pytest.approx(single["train"]["val/loss"], rel=1e-4)
    assert len(list(run_dir.rglob("metrics.csv"))) == 1                  # only global rank 0 logs
