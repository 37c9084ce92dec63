"""Real engines for the study tests, started and stopped by the tests' own set-up: a PostgreSQL server (Debian's
package, a throw-away cluster in a temp dir on a free loopback port), a local Ray instance, and the one-machine
SLURM cluster of scripts/setup_slurm.sh. Each is skipped, with one line saying why, only where its package cannot
be installed here."""

from __future__ import annotations

import fcntl
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tunelab.paths import REPO_DIR


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apt_install(*packages: str) -> str | None:
    """Install Debian packages when this is root on Debian (as CI is); None, or why it cannot be done."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{' '.join(packages)} not installed, and only root can apt-get install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: root runs it as the `postgres` user the package created."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def run(command: list[str], timeout: int = 120) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout[-1500:]} {done.stderr[-1500:]}"


@contextmanager
def postgres_server():
    """A PostgreSQL server of its own: initdb in a fresh temp dir (pytest's are root-only, and the server runs as
    `postgres`), on a free port on 127.0.0.1; yields its URL; stopped and removed afterwards."""
    bindir = postgres_bin()
    if bindir is None:
        why = apt_install("postgresql")
        bindir = postgres_bin()
        if bindir is None:
            pytest.skip(f"no PostgreSQL server: {why or 'the postgresql package has no initdb'}")
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    data, port = tmp / "pgdata", free_port()
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
    try:
        run(as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]))
        options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections=50"
        run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(tmp / "server.log"), "-w", "start"]))
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, timeout=120)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- SLURM ------------------------------------------------------------------------------------------------

SETUP_SLURM = REPO_DIR / "scripts" / "setup_slurm.sh"


def slurm_up() -> bool:
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True) if shutil.which("sinfo") else None
    return bool(done and done.returncode == 0 and ("idle" in done.stdout or "mix" in done.stdout or "alloc" in done.stdout))


def ensure_slurm() -> None:
    """The one-machine cluster of scripts/setup_slurm.sh (installed and started when missing and this is root)."""
    if slurm_up():
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster here, and only root can start one (scripts/setup_slurm.sh)")
    with open("/tmp/tunelab-setup-slurm.lock", "w") as lock:   # pytest-xdist workers: one set-up at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(["bash", str(SETUP_SLURM)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"scripts/setup_slurm.sh could not start SLURM: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    for _ in range(60):
        if slurm_up():
            return
        time.sleep(1)
    pytest.skip("scripts/setup_slurm.sh ran, but sinfo shows no idle node after 60 s")


# --- Ray --------------------------------------------------------------------------------------------------

@contextmanager
def ray_cluster(env: dict, cpus: int = 2):
    """A local Ray cluster (`ray start --head` on 127.0.0.1, token authentication with a token of its own), stopped
    by ending the process group this started; yields (its address, the environment a driver needs to join it: the
    token). Its workers get `env` (PYTHONPATH, threads), as the machines of a real cluster have their own."""
    import signal
    import sys

    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed: pip install 'tunelab[ray]'")
    ray_bin = Path(sys.executable).parent / "ray"
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env={**env, **auth}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline, said = time.monotonic() + 300, []
        while not any("Ray runtime started" in line for line in said):   # what `ray start` prints once it is up
            line = head.stdout.readline()
            assert line and time.monotonic() < deadline, f"ray start --head did not come up: {''.join(said)[-3000:]}"
            said.append(line)
        threading.Thread(target=head.stdout.read, daemon=True).start()   # keep its pipe drained
        yield address, auth
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
