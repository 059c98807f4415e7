"""The launch files and the Docker image agree with each other, with the CLI and with the run config.

No cloud, Kubernetes, Slurm or Docker engine runs here, so these tests read the files: the Ray
cluster file goes through Ray's own schema validation, entry points through the real `contrast`
argument parser and config loader, shell scripts through `bash -n`.
"""
from __future__ import annotations

import configparser
import copy
import fnmatch
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH, DOCKER = ROOT / "launch", ROOT / "docker"
IMAGE_WORKDIR = "/app"                    # WORKDIR of docker/Dockerfile: repo files are copied under it
CLUSTER_CONFIG = "configs/vitb32_laion.yaml"   # the GPU-cluster config the launchers run


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _pins() -> dict[str, str]:
    """`name==version` lines of constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            instr, _, args = current.strip().partition(" ")
            lines.append((instr.upper(), " ".join(args.split())))
        current = ""
    return lines


def _rayjob_pods() -> list[dict]:
    spec = _yaml(LAUNCH / "rayjob.yaml")["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]] + spec["workerGroupSpecs"]


def _sbatch_options() -> dict[str, str]:
    opts = {}
    for line in (LAUNCH / "slurm.sbatch").read_text().splitlines():
        if m := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            opts[m.group(1)] = m.group(2)
    return opts


def _shell_command(path: Path, start: str, values: dict[str, str]) -> list[str]:
    """The words of the (continued) command line of a shell script that contains `start`, with
    `$name` replaced by `values[name]`, arithmetic `$((…))` by 16 and `"$@"` dropped."""
    text = path.read_text().replace("\\\n", " ")
    line = next((ln for ln in text.splitlines() if start in ln and not ln.lstrip().startswith("#")), None)
    assert line is not None, f"{path.name}: no command line with {start!r}"
    line = line[line.index(start):].replace('"$@"', "")
    line = re.sub(r"\$\(\(.*?\)\)", "16", line)
    return shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], line))


def _train_entry_points() -> dict[str, list[str]]:
    """Every launcher's `contrast train ...` command line, as it runs with its default arguments."""
    slurm_text = (LAUNCH / "slurm.sbatch").read_text()
    slurm_default = re.search(r"config=\$\{1:-([^}]+)\}", slurm_text).group(1)
    return {
        "rayjob.yaml": shlex.split(_yaml(LAUNCH / "rayjob.yaml")["spec"]["entrypoint"]),
        "slurm.sbatch": _shell_command(LAUNCH / "slurm.sbatch", "contrast train",
                                       {"config": slurm_default, "address": "10.0.0.1:6379"}),
        "submit.sh": _shell_command(LAUNCH / "submit.sh", "contrast train", {"config": CLUSTER_CONFIG}),
    }


# ------------------------------------------------------------------------------------ the image
def test_one_image_name_everywhere_tagged_with_the_package_version():
    cluster = _yaml(LAUNCH / "ray-cluster.yaml")
    compose = _yaml(DOCKER / "compose.yaml")
    images = {"ray-cluster.yaml": cluster["docker"]["image"]}
    for pod in _rayjob_pods():
        for c in pod["template"]["spec"]["containers"]:
            images[f"rayjob.yaml:{c['name']}"] = c["image"]
    for name, service in compose["services"].items():
        images[f"compose.yaml:{name}"] = service["image"]
    build_tag = re.search(r"docker build .*-t (\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    images["Dockerfile (build command)"] = build_tag

    assert len(set(images.values())) == 1, images
    version = _setup_cfg()["metadata"]["version"]
    assert build_tag.rsplit(":", 1)[1] == version, f"image tag {build_tag} vs package version {version}"


def test_dockerfile_cuda_base_pinned_torch_then_the_package():
    steps = _dockerfile()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    base = next(a for i, a in steps if i == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("nvidia/cuda:") and "-devel-" in base, base    # nvcc for DeepSpeed's JIT ops

    runs = [(n, a) for n, (i, a) in enumerate(steps) if i == "RUN"]
    torch_pin = f"torch=={_pins()['torch']}"
    torch_step = next(n for n, a in runs if torch_pin in a)
    assert "-c constraints.txt" in dict(runs)[torch_step]
    package_step = next(n for n, a in runs if re.search(r"pip install .*\"\.\[", a))
    assert "-c constraints.txt" in dict(runs)[package_step]
    assert torch_step < package_step, "torch must be installed, pinned, before anything that depends on it"
    extras = re.search(r'"\.\[([\w,]+)\]"', dict(runs)[package_step]).group(1).split(",")
    assert "cluster" in extras, "cluster nodes need the job server and dashboard of ray[default]"
    cluster_extra = _setup_cfg()["options.extras_require"]["cluster"]
    assert re.search(r"^ray\[default\]", cluster_extra.strip(), re.M), cluster_extra

    copied = {}
    for n, (i, a) in enumerate(steps):
        if i == "COPY" and "--from" not in a:
            *sources, dest = a.split()
            for s in sources:
                copied[s] = n
    assert copied["constraints.txt"] < torch_step
    for needed in ("setup.cfg", "pyproject.toml", "pipeline", "configs"):
        assert copied[needed] < package_step, f"{needed} must be copied before the package is installed"
    assert ("WORKDIR", IMAGE_WORKDIR) in steps


def test_dockerignore_keeps_every_copied_path_and_drops_the_venv():
    patterns = [p.strip() for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def included(path: str) -> bool:                      # last matching pattern wins, as in Docker
        keep = True
        for p in patterns:
            negate, pat = p.startswith("!"), p.lstrip("!")
            if fnmatch.fnmatch(path, pat):                # fnmatch's * also crosses '/', like **
                keep = negate
        return keep

    for instr, args in _dockerfile():
        if instr == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
                files = [ROOT / src] if (ROOT / src).is_file() else [p for p in (ROOT / src).rglob("*") if p.is_file()]
                rel = files[0].relative_to(ROOT).as_posix()
                assert included(rel), f"{rel} is copied by the Dockerfile but excluded from the build context"
    assert not included(".venv/bin/python")
    assert not included("runs/demo/published/x")


# ----------------------------------------------------------------------------- the entry points
def test_every_launcher_runs_contrast_train_on_a_config_shipped_in_the_image():
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"]
    console = dict(line.replace(" ", "").split("=") for line in scripts.strip().splitlines())
    copied = [a.split()[-1] for i, a in _dockerfile() if i == "COPY"]

    for launcher, argv in _train_entry_points().items():
        assert argv[:2] == ["contrast", "train"], (launcher, argv)
        assert console.get("contrast") == "pipeline.cli:entry"
        args = build_parser().parse_args(argv[1:])           # the real CLI accepts the command line
        assert args.command == "train"
        config = args.config.removeprefix(IMAGE_WORKDIR + "/")
        assert (ROOT / config).is_file(), f"{launcher}: config {args.config} is not in the repository"
        assert any(config.startswith(d.strip("./") + "/") for d in copied), f"{config} not copied into the image"
        cfg = load_config(ROOT / config, args.overrides)        # validates every override too
        assert cfg.cluster.address == "auto" or launcher == "slurm.sbatch", launcher


def test_cluster_config_is_a_gpu_run():
    cfg = load_config(ROOT / CLUSTER_CONFIG)
    assert cfg.cluster.use_gpu and cfg.cluster.gpus_per_worker == 1
    assert cfg.cluster.max_failures >= 1
    assert cfg.run_dir.startswith("s3://")                    # every node sees the same run_dir


# ------------------------------------------------------------------------- resources per launcher
def _check_nodes(where: str, nodes: int, gpus: float, cpus: float) -> None:
    """`nodes` GPU nodes of `gpus` GPUs and `cpus` CPUs hold exactly the config's workers."""
    cfg = load_config(ROOT / CLUSTER_CONFIG).cluster
    assert nodes * gpus == cfg.num_workers * cfg.gpus_per_worker, \
        f"{where}: {nodes} nodes × {gpus} GPUs for {cfg.num_workers} workers × {cfg.gpus_per_worker} GPU"
    workers_per_node = gpus / cfg.gpus_per_worker
    assert workers_per_node * cfg.cpus_per_worker <= cpus, \
        f"{where}: {workers_per_node} workers × {cfg.cpus_per_worker} CPUs do not fit in {cpus} CPUs"


def test_ray_cluster_file_passes_rays_schema_and_holds_the_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(LAUNCH / "ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))
    gpu_types = {k: t for k, t in raw["available_node_types"].items() if t["resources"].get("GPU")}
    assert raw["head_node_type"] not in gpu_types, "no training worker on the head"
    assert len(gpu_types) == 1
    (t,) = gpu_types.values()
    assert t["min_workers"] == t["max_workers"], "a fixed-size training group"
    _check_nodes("ray-cluster.yaml", t["min_workers"], t["resources"]["GPU"], t["resources"]["CPU"])
    assert raw["setup_commands"] == [], "Ray's default set-up would pip-install another Ray over the image's"
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_rayjob_matches_ray_version_and_holds_the_workers():
    job = _yaml(LAUNCH / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == _pins()["ray"]
    assert spec["authOptions"]["mode"] == "token"
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits == requests, "guaranteed pods: requests equal limits"
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    _check_nodes("rayjob.yaml", group["replicas"], int(limits["nvidia.com/gpu"]), float(limits["cpu"]))
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_slurm_allocation_holds_the_workers():
    opts = _sbatch_options()
    _check_nodes("slurm.sbatch", int(opts["nodes"]), int(opts["gpus-per-node"]), int(opts["cpus-per-task"]))
    assert opts["ntasks-per-node"] == "1", "one Ray node per Slurm node"


def test_compose_starts_a_head_and_two_workers_that_join_it():
    compose = _yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    heads = [n for n, s in services.items() if "--head" in s["command"]]
    assert len(heads) == 1
    head = services[heads[0]]
    port = re.search(r"--port=(\d+)", head["command"]).group(1)
    workers = [s for n, s in services.items() if n not in heads]
    assert len(workers) == 2
    for w in workers:
        assert f"--address={heads[0]}:{port}" in w["command"]
        assert heads[0] in w["depends_on"]
    for s in services.values():
        assert (DOCKER / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        assert all(str(p).startswith("127.0.0.1:") for p in s.get("ports", [])), "publish on 127.0.0.1 only"


# -------------------------------------------------------------------------------- shell scripts
@pytest.mark.parametrize("name", ["slurm.sbatch", "submit.sh"])
def test_shell_scripts_parse_and_are_executable(name):
    path = LAUNCH / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert path.stat().st_mode & 0o111, f"{name} is not executable"


def test_submit_without_a_config_prints_usage_and_fails():
    out = subprocess.run([str(LAUNCH / "submit.sh")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "submit.sh CONFIG" in out.stderr


def test_slurm_dashboard_stays_on_localhost_and_the_cluster_needs_a_token():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "--dashboard-host=127.0.0.1" in text
    assert "RAY_AUTH_MODE=token" in text


# --------------------------------------------- the scripts, run: a fake two-node Slurm allocation
FAKE_SLURM = {
    # `scontrol show hostnames LIST`: one name per line
    "scontrol": '[[ "$1 $2" == "show hostnames" ]] || exit 1\ntr "," "\\n" <<< "$3"\n',
    # srun: drop its options (and -w's value), run the step's command on this machine
    "srun": 'while [[ $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done\nexec "$@"\n',
}
# `ray job submit` needs the job server of ray[default] (the image has it; the test venv has only
# ray[train]). Stand-in: do what the job server does with a submission, i.e. run the entrypoint in
# the uploaded working dir with RAY_ADDRESS naming the cluster; everything else goes to the real `ray`.
FAKE_JOB_SERVER = """
if [[ "$1 $2" == "job submit" ]]; then
    shift 2; dir=.
    while [[ $1 != -- ]]; do
        case $1 in --working-dir) dir=$2; shift 2;; --address) [[ $2 == http* ]] || exit 3; shift 2;; *) exit 4;; esac
    done
    shift; cd "$dir" && RAY_ADDRESS=$CLUSTER_GCS exec "$@"
fi
exec "$REAL_RAY" "$@"
"""


def _tiny_config(path: Path, data: Path, run_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "run_dir": str(run_dir),
        "data": {"train_urls": [str(data / "train")], "image_size": 32, "context_length": 16},
        "model": {"name": "tiny"},
        "train": {"steps": 2, "global_batch": 8, "warmup_steps": 1, "log_every": 1, "precision": "fp32"},
        "cluster": {"cpus_per_worker": 1},
        "checkpoint": {"every_steps": 2},
        "eval": {"schedule": "off"},
        "logging": {"progress": False},
    }))
    return path


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_script_then_submit_on_a_fake_two_node_allocation(tmp_path):
    """slurm.sbatch on two fake nodes (srun runs steps here): a token-protected two-node Ray cluster,
    `contrast train` with one worker per node; then submit.sh sends a second run to the same cluster
    through its job server. Both runs publish."""
    import os
    import signal
    import sys
    import tempfile

    from pipeline import storage
    from pipeline.data import synthesize

    synthesize(str(tmp_path / "data"), 64, eval_samples=4, image_size=32, shard_size=8, progress=False)
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in FAKE_SLURM.items():
        (shims / name).write_text("#!/usr/bin/env bash\n" + body)
        (shims / name).chmod(0o755)
    token = "t" * 32
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")            # short: Ray's socket paths are limited
    env = {**os.environ, "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node-a,node-b", "SLURM_CPUS_PER_TASK": "1", "WORKERS_PER_NODE": "1",
           "RAY_PORT": str(_free_port()), "RAY_TMPDIR": ray_tmp, "RAY_AUTH_TOKEN": token}
    log = tmp_path / "slurm.out"         # a file: the Ray nodes left running would hold a pipe open
    with open(log, "w") as out_file:
        job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"),
                                str(_tiny_config(tmp_path / "a.yaml", tmp_path / "data", tmp_path / "run-a"))],
                               env=env, stdout=out_file, stderr=subprocess.STDOUT,
                               start_new_session=True)      # the Ray nodes it leaves running share its group
    try:
        job.wait(timeout=400)
        out = log.read_text()
        assert job.returncode == 0, out[-4000:]
        assert "slurm.sbatch: 2 Ray nodes up" in out
        assert storage.complete_subdirs(str(tmp_path / "run-a" / "published")) == ["step_00000002"]
        address = re.search(r"2 Ray nodes up at (\S+)", out).group(1)

        job_server = tmp_path / "job-server"
        job_server.mkdir()
        (job_server / "ray").write_text("#!/usr/bin/env bash\n" + FAKE_JOB_SERVER)
        (job_server / "ray").chmod(0o755)
        config_b = _tiny_config(tmp_path / "b.yaml", tmp_path / "data", tmp_path / "run-b")
        submit = subprocess.run([str(LAUNCH / "submit.sh"), str(config_b), "cluster.num_workers=2"],
                                env={**env, "PATH": f"{job_server}:{env['PATH']}", "RAY_AUTH_MODE": "token",
                                     "REAL_RAY": str(Path(sys.executable).with_name("ray")),
                                     "CLUSTER_GCS": address},
                                cwd=tmp_path / "job-server", capture_output=True, text=True, timeout=400)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert storage.complete_subdirs(str(tmp_path / "run-b" / "published")) == ["step_00000002"]
        assert token not in out + submit.stdout + submit.stderr
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):   # this test's own process group
            try:
                os.killpg(job.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(wait)
        import shutil
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_launch_file_turns_token_authentication_on():
    """README 'Security': no launch path starts a Ray cluster that accepts requests without the token."""
    cluster = _yaml(LAUNCH / "ray-cluster.yaml")
    assert "--env=RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for name, service in _yaml(DOCKER / "compose.yaml")["services"].items():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    assert "mode: token" in (LAUNCH / "rayjob.yaml").read_text()
    assert "export RAY_AUTH_MODE=token" in (LAUNCH / "slurm.sbatch").read_text()
