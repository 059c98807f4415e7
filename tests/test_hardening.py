"""A real `contrast train` as users run it: nothing on the network, token authentication, clean signals."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONTRAST = str(Path(sys.executable).parent / "contrast")
LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")


def start_training(run_dir: Path, data: Path, steps: int = 400) -> subprocess.Popen:
    """`contrast train` in a session of its own (so a test can signal its whole process group), with the
    environment a user has: no RAY_AUTH_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.Popen(
        [CONTRAST, "train", str(REPO / "configs/demo.yaml"), f"run_dir={run_dir}", f"data.train_urls=[{data}]",
         "data.image_size=32", "data.context_length=32", f"train.steps={steps}", "train.global_batch=32",
         "cluster.num_workers=2", "checkpoint.every_steps=10", "eval.schedule=off", "train.log_every=10",
         "gradcache.chunk_size=8"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, text: str, timeout_s: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if text in line or time.monotonic() > deadline:
            break
    assert any(text in line for line in lines), "".join(lines[-30:])
    return lines


def listeners(root: int) -> list[tuple[str, str, str]]:
    """(local host, port, process name) of every listening TCP/UDP socket of a process tree."""
    pids = {root} | {c.pid for c in psutil.Process(root).children(recursive=True)}
    out = subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owner = next((pid for pid in pids if f"pid={pid}," in line), None)
        if owner is not None:
            host, port = line.split()[4].rsplit(":", 1)
            found.append((host, port, psutil.Process(owner).name()))
    return found


def ray_client(gcs: str, env: dict[str, str]) -> str:
    """Another process on this machine trying to run a task in the training's Ray cluster: its output
    ("RAN 42" when it got in). A client that cannot get in retries; after 120 s it has not got in."""
    code = ("import ray, sys\nray.init(address=sys.argv[1])\n"
            "print('RAN', ray.get(ray.remote(num_cpus=0)(lambda: 6 * 7).remote()), flush=True)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env = {**clean, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **env}       # a local client, on loopback
    try:
        done = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True,
                              timeout=120)
        return done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        return f"timed out: {e.stdout or ''}"


def gcs_address(root: int) -> str:
    """127.0.0.1:PORT of the tree's GCS server (it listens on loopback only)."""
    found = listeners(root)
    ports = [port for _, port, name in found if name == "gcs_server"]
    assert ports, found
    return f"127.0.0.1:{ports[0]}"


def token_of(root: int) -> str:
    """The per-run token, read from the environment of a Ray process of the run (same user): the control."""
    gcs = next(c for c in psutil.Process(root).children(recursive=True) if c.name() == "gcs_server")
    return gcs.environ()["RAY_AUTH_TOKEN"]


@pytest.fixture(scope="module")
def data(synth) -> Path:
    return synth(512, shard_size=64) / "train"


def test_a_local_run_listens_on_loopback_only_and_refuses_clients_without_the_token(data, tmp_path):
    proc = start_training(tmp_path / "run", data)
    try:
        wait_for(proc, "step 10/")
        seen = listeners(proc.pid)
        assert seen and all(host.startswith(LOOPBACK) for host, _, _ in seen), seen
        gcs = gcs_address(proc.pid)
        for env in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
            refused = ray_client(gcs, env)
            assert "RAN" not in refused, (env, refused[-1000:])
        allowed = ray_client(gcs, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_of(proc.pid)})
        assert "RAN 42" in allowed, allowed[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("signum, whom", [(signal.SIGTERM, "driver"), (signal.SIGINT, "group")])
def test_a_signal_stops_the_run_with_how_to_resume(data, tmp_path, signum, whom):
    """SIGTERM to the driver (Kubernetes), SIGINT to the whole group (Ctrl-C): the run ends with exit code
    128 + signal, one line saying where it stopped and how to resume, no traceback and no Ray process left."""
    proc = start_training(tmp_path / "run", data)
    wait_for(proc, "step 20/")
    tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    started = time.monotonic()
    os.kill(proc.pid, signum) if whom == "driver" else os.killpg(proc.pid, signum)
    rest = proc.stdout.read()
    proc.wait(120)
    assert proc.returncode == 128 + signum, rest[-3000:]
    message = [line for line in rest.splitlines() if line.startswith("contrast train: interrupted at step")]
    assert message and "rerun the same command to resume from step" in message[0], rest[-3000:]
    assert "Traceback" not in rest and "SIGSEGV" not in rest and time.monotonic() - started < 60
    time.sleep(3)
    left = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == []
    stopped_at = int(re.search(r"resume from step (\d+)", message[0]).group(1))
    status = subprocess.run([CONTRAST, "status", str(tmp_path / "run")], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"stopped by SIG(TERM|INT) after checkpointing step {stopped_at}\n", status.stdout), status.stdout
    assert f"a resume starts at step {stopped_at}" in status.stdout and "trainer      none" in status.stdout


def in_a_terminal(args: list[str], env: dict[str, str], timeout_s: float = 600) -> tuple[int, str]:
    """Run a command on a pseudo-terminal of 40 × 160 (as a user's console: tqdm draws bars there, never
    into a pipe); its exit code and everything it wrote, escape sequences removed."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:                           # EIO: the terminal's other side closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    proc.wait(30)
    return proc.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))


def test_the_console_shows_our_lines_only_with_progress_eta_and_a_bar(data, tmp_path):
    """What a user watches in a terminal: a progress line with an ETA at every log_every and a bar that ends
    full, and none of Ray Train's reports, checkpoint records or worker-group lines, torch's or DeepSpeed's
    warnings (issue 23: 42 lines → 18)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    code, output = in_a_terminal(
        [CONTRAST, "train", str(REPO / "configs/demo.yaml"), f"run_dir={tmp_path / 'run'}", f"data.train_urls=[{data}]",
         "data.image_size=32", "data.context_length=32", "train.steps=20", "train.global_batch=32",
         "cluster.num_workers=2", "checkpoint.every_steps=10", "eval.schedule=off", "train.log_every=10",
         "gradcache.chunk_size=8"], env)
    assert code == 0, output[-4000:]
    for noise in ("Checkpoint successfully created", "Reporting training result", "FutureWarning",
                  "Setting accelerator", "Started training worker group", "without a manifest", "Warning:"):
        assert noise not in output, (noise, output)
    progress = re.findall(r"step (\d+)/20 \((\d+)%\)  loss [\d.]+  \d+ samples/s  data wait \d+%  ETA (\d+):(\d\d)",
                          output)
    assert [(int(s), int(p)) for s, p, _, _ in progress] == [(10, 50), (20, 100)], output
    assert progress[-1][2:] == ("0", "00")
    bars = re.findall(r"train: +(\d+)%\|[^|]*\| *([\d.]+)/([\d.]+)", output)
    assert bars and bars[-1] == ("100", "20.0", "20.0"), bars[-5:]
    ray_files = [p.name for p in (tmp_path / "run" / "ray").rglob("*") if p.is_file()]
    assert set(ray_files) <= {".validate_storage_marker"}, ray_files         # Ray Train's check only
    lines = [line for line in re.split(r"[\r\n]+", output) if line.strip() and not line.startswith("train:")]
    assert len(lines) <= 24, "\n".join(lines)
