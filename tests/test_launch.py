"""The launch scripts under launch/: the commands each prints with --dry-run, the same commands
run against stand-in gcloud/sbatch executables, the train command read again by a worker's shell,
and launch/tpu/worker.sh starting and stopping a run. Nothing here needs gcloud or SLURM."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = REPO / "launch/tpu/tpu.sh"
WORKER_SH = REPO / "launch/tpu/worker.sh"
SUBMIT_SH = REPO / "launch/slurm/submit.sh"
# A gin string with a space in it: it must reach the trainer as one argument, quotes and all.
TRAIN_FLAGS = ["--gin_file=gin/spectron_base.gin", "--gin.MODEL_DIR='gs://b/run 1'"]
XLA = "XLA_FLAGS=--xla_a=1 --xla_b=2"
needs_setsid = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (Linux)")


def sh(script, *args, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
        **kwargs,
    )


def commands(out: str) -> list[list[str]]:
    """The printed command lines, each as the argv it stands for."""
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def dry(args) -> list[str]:
    """args with --dry-run added where it is an option (after a subcommand, before any --)."""
    args = list(args)
    at = 1 if args and not args[0].startswith("-") else 0
    return [*args[:at], "--dry-run", *args[at:]]


def tpu(*args, **kwargs) -> list[list[str]]:
    return commands(sh(TPU_SH, *dry(args), **kwargs).stdout)


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def remote(argv: list[str]) -> list[str]:
    """The words of the command an ssh line runs on the workers."""
    return shlex.split(value(argv, "--command"))


def ssh_prefix(node: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--zone", "z", f"--worker={worker}"]


@pytest.mark.parametrize(
    "script,args,expect",
    [
        (
            "launch/tpu/train.sh",
            [
                "--tpu",
                "v5-8",
                "--zone",
                "us-c",
                "--dry-run",
                "--",
                "--gin_file=gin/spectron_base.gin",
            ],
            [
                "gcloud compute tpus tpu-vm ssh v5-8",
                "--worker=all",
                "spectron_jax.train",
                "--gin_file=gin/spectron_base.gin",
            ],
        ),
        (
            "launch/slurm/submit.sh",
            [
                "--nodes",
                "2",
                "--gpus_per_node",
                "4",
                "--dry-run",
                "--",
                "--gin_file=gin/spectron_base.gin",
            ],
            [
                "sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4",
                "train.sbatch",
                "spectron_jax.train --gin_file=gin/spectron_base.gin",
            ],
        ),
    ],
)
def test_launch_scripts_dry_run(script, args, expect):
    out = subprocess.run(
        ["bash", str(REPO / script), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    for piece in expect:
        assert piece in out, (piece, out)
    bad = subprocess.run(
        ["bash", str(REPO / script), "--bogus"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_create_one_slice_and_multislice():
    common = ["--zone", "z", "--runtime", "v2-alpha-tpuv5"]
    [one] = tpu("create", "--tpu", "t", "--accelerator", "v5p-8", *common)
    assert one == [
        *"gcloud compute tpus queued-resources create t --zone z".split(),
        *"--accelerator-type v5p-8 --runtime-version v2-alpha-tpuv5 --node-id t".split(),
    ]
    [multi] = tpu(
        "create",
        "--tpu",
        "pod",
        "--accelerator",
        "v5p-64",
        *common,
        "--num_slices",
        "4",
        "--spot",
        "--project",
        "p",
    )
    assert multi[:6] == "gcloud compute tpus queued-resources create pod".split()
    assert value(multi, "--accelerator-type") == "v5p-64"
    assert value(multi, "--node-count") == "4" and value(multi, "--node-prefix") == "pod"
    assert "--node-id" not in multi and "--spot" in multi and value(multi, "--project") == "p"
    # Only gcloud's alpha track has --best-effort.
    [best] = tpu("create", "--tpu", "t", "--accelerator", "v5p-8", *common, "--best-effort")
    assert best[:3] == ["gcloud", "alpha", "compute"] and "--best-effort" in best


def test_status_wait_and_delete_name_the_queued_resource():
    args = ["--tpu", "t", "--zone", "z", "--num_slices", "2"]
    base = "gcloud compute tpus queued-resources".split()
    assert tpu("status", *args) == [[*base, "describe", "t", "--zone", "z"]]
    assert tpu("wait", *args) == [
        [*base, "describe", "t", "--zone", "z", "--format", "value(state.state)"]
    ]
    assert tpu("delete", *args) == [[*base, "delete", "t", "--zone", "z", "--force"]]


PIP = [".venv/bin/pip", "install", "-e", ".[tpu]", "-c", "constraints.txt"]


def contains(words: list[str], part: list[str]) -> bool:
    return any(words[i : i + len(part)] == part for i in range(len(words)))


def test_install_copies_the_repository_to_every_worker_of_every_slice(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    tarball = str(tmp_path / "spectron-jax-src.tar.gz")
    cmds = tpu("install", "--tpu", "pod", "--zone", "z", "--num_slices", "2", env=env)
    assert cmds[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert not pathlib.Path(tarball).exists()  # --dry-run ran nothing
    for i, (scp, ssh) in enumerate(zip(cmds[1::2], cmds[2::2], strict=True)):
        assert scp[:5] == "gcloud compute tpus tpu-vm scp".split()
        assert scp[5:7] == [tarball, f"pod-{i}:/tmp/spectron-jax-src.tar.gz"]
        assert "--worker=all" in scp
        assert ssh[: len(ssh_prefix(""))] == ssh_prefix(f"pod-{i}")
        words = remote(ssh)
        assert contains(words, ["tar", "-xzf", "/tmp/spectron-jax-src.tar.gz"])
        assert contains(words, ["python3.11", "-m", "venv", ".venv"]) and contains(words, PIP)
    assert len(cmds) == 5

    [clone] = tpu(
        "install",
        "--tpu",
        "t",
        "--zone",
        "z",
        "--git_url",
        "https://example.org/s.git",
        "--ref",
        "v1",
        "--base_python",
        "python3.12",
    )
    words = remote(clone)
    assert contains(words, ["git", "clone", "-q", "https://example.org/s.git", "~/spectron-jax"])
    assert contains(words, ["git", "fetch", "-q", "origin", "v1"])
    assert contains(words, ["python3.12", "-m", "venv", ".venv"]) and contains(words, PIP)


def start_words(argv: list[str]) -> list[str]:
    """What an ssh line of `train` starts: the words after `worker.sh start`."""
    words = remote(argv)
    assert words[:5] == ["cd", "~/spectron-jax", "&&", "bash", "launch/tpu/worker.sh"]
    assert words[5] == "start"
    return words[6:]


def test_train_multislice_sets_megascale_per_slice_and_follows_worker_0():
    cmds = tpu(
        "train",
        "--tpu",
        "pod",
        "--zone",
        "z",
        "--num_slices",
        "3",
        "--env",
        XLA,
        "--",
        *TRAIN_FLAGS,
    )
    describe, *starts, follow = cmds
    assert describe == [
        *"gcloud compute tpus tpu-vm describe pod-0 --zone z --format".split(),
        "value(networkEndpoints[0].ipAddress)",
    ]
    assert len(starts) == 3
    for i, ssh in enumerate(starts):
        assert ssh[: len(ssh_prefix(""))] == ssh_prefix(f"pod-{i}")
        assert start_words(ssh) == [
            "env",
            "MEGASCALE_COORDINATOR_ADDRESS=SLICE0_WORKER0_IP:8080",
            "MEGASCALE_NUM_SLICES=3",
            f"MEGASCALE_SLICE_ID={i}",
            "MEGASCALE_PORT=8080",
            XLA,
            ".venv/bin/python",
            "-m",
            "spectron_jax.train",
            "--distributed",
            *TRAIN_FLAGS,
        ]
    assert follow[: len(ssh_prefix(""))] == ssh_prefix("pod-0", "0")
    assert remote(follow)[-2:] == ["launch/tpu/worker.sh", "logs"]

    given = tpu(
        "train",
        "--tpu",
        "pod",
        "--zone",
        "z",
        "--num_slices",
        "2",
        "--coordinator",
        "10.0.0.5",
        "--megascale_port",
        "9000",
        "--no_follow",
        "--",
        *TRAIN_FLAGS,
    )
    assert [argv[5] for argv in given] == ["pod-0", "pod-1"]  # no lookup, no log following
    assert start_words(given[1])[1:5] == [
        "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.5:9000",
        "MEGASCALE_NUM_SLICES=2",
        "MEGASCALE_SLICE_ID=1",
        "MEGASCALE_PORT=9000",
    ]


def test_train_one_slice_and_the_train_sh_wrapper_agree():
    args = ["--tpu", "t", "--zone", "z", "--project", "p", "--python", "python3"]
    start, follow = tpu("train", *args, "--", *TRAIN_FLAGS)
    assert start[: len(ssh_prefix(""))] == ssh_prefix("t")
    assert value(start, "--project") == "p"
    train_cmd = ["python3", "-m", "spectron_jax.train", "--distributed", *TRAIN_FLAGS]
    assert start_words(start) == train_cmd
    assert follow[5] == "t" and "--worker=0" in follow
    wrapper = sh(REPO / "launch/tpu/train.sh", *args, "--dry-run", "--", *TRAIN_FLAGS).stdout
    assert commands(wrapper) == [start, follow]


def test_logs_and_stop():
    args = ["--tpu", "pod", "--zone", "z", "--num_slices", "2"]
    [one] = tpu("logs", *args, "--slice", "1", "--worker", "3")
    assert one[: len(ssh_prefix(""))] == ssh_prefix("pod-1", "3")
    [every] = tpu("logs", *args, "--worker", "all")
    assert "--worker=all" in every and remote(every)[-2:] == ["logs", "--prefix"]
    stops = tpu("stop", *args, "--signal", "KILL")
    assert [argv[5] for argv in stops] == ["pod-0", "pod-1"]
    assert all("--worker=all" in argv and remote(argv)[-2:] == ["stop", "KILL"] for argv in stops)


@pytest.mark.parametrize(
    "script,args,message",
    [
        (TPU_SH, [], "missing subcommand"),
        (TPU_SH, ["launch", "--tpu", "t", "--zone", "z"], "unknown subcommand: launch"),
        (TPU_SH, ["train", "--zone", "z"], "missing --tpu"),
        (TPU_SH, ["train", "--tpu", "t"], "missing --zone"),
        (TPU_SH, ["train", "--tpu", "--zone", "z"], "--tpu needs a value"),
        (TPU_SH, ["train", "--tpu", "t", "--zone", "z", "--bogus"], "unknown argument: --bogus"),
        (TPU_SH, ["stop", "--tpu", "t", "--zone", "z", "--", "--x=1"], "takes no train flags"),
        (TPU_SH, ["create", "--tpu", "t", "--zone", "z", "--runtime", "r"], "--accelerator"),
        (TPU_SH, ["create", "--tpu", "t", "--zone", "z", "--spot", "--reserved"], "exclude"),
        (TPU_SH, ["train", "--tpu", "t", "--zone", "z", "--num_slices", "0"], "--num_slices"),
        (
            TPU_SH,
            ["logs", "--tpu", "t", "--zone", "z", "--num_slices", "2", "--slice", "2"],
            "--slice",
        ),
        (TPU_SH, ["train", "--tpu", "t", "--zone", "z", "--env", "XLA_FLAGS"], "KEY=VALUE"),
        (TPU_SH, ["train", "--tpu", "t", "--zone", "z", "--repo_dir", "a b"], "--repo_dir"),
        (REPO / "launch/tpu/train.sh", ["--tpu", "t", "--zone", "z", "--bogus"], "--bogus"),
        (SUBMIT_SH, ["--nodes", "two"], "--nodes must be a positive integer"),
        (SUBMIT_SH, ["--account"], "--account needs a value"),
        (SUBMIT_SH, ["--env", "=x"], "KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(script, args, message):
    out = sh(script, *(dry(args) if args else []), check=False)
    assert out.returncode == 2, out
    assert message in out.stderr and out.stdout == ""


def test_help_lists_every_subcommand():
    out = sh(TPU_SH, "help").stdout
    for sub in ("create", "status", "wait", "install", "train", "logs", "stop", "delete"):
        assert f"\n  {sub} " in out


def test_slurm_dry_run_prints_the_sbatch_and_srun_lines():
    out = sh(
        SUBMIT_SH,
        "--nodes",
        "2",
        "--gpus_per_node",
        "4",
        "--account",
        "acc",
        "--job-name",
        "spec",
        "--env",
        XLA,
        "--env",
        "PYTHON=.venv/bin/python",
        "--dry-run",
        "--",
        *TRAIN_FLAGS,
    ).stdout
    sbatch_line, srun_line = out.splitlines()
    assert shlex.split(sbatch_line) == [
        *["env", XLA, "PYTHON=.venv/bin/python", "sbatch", "--nodes=2", "--ntasks-per-node=4"],
        *["--gpus-per-node=4", "--time=24:00:00", "--account=acc", "--job-name=spec"],
        *["--export=ALL", str(REPO / "launch/slurm/train.sbatch"), *TRAIN_FLAGS],
    ]
    prefix = "# each task runs: "
    assert srun_line.startswith(prefix)
    assert shlex.split(srun_line[len(prefix) :]) == [
        *["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "-m", "spectron_jax.train"],
        *TRAIN_FLAGS,
    ]


@pytest.fixture
def fake_tools(tmp_path):
    """gcloud and sbatch stand-ins first on PATH; each records its argv (a JSON line) in calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    script = f"""#!{sys.executable}
import json, os, pathlib, sys
name = pathlib.Path(sys.argv[0]).name
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "sbatch":
    print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
elif "describe" in sys.argv and "--format" in sys.argv:
    fmt = sys.argv[sys.argv.index("--format") + 1]
    print("10.1.2.3" if "networkEndpoints" in fmt else os.environ.get("FAKE_QR_STATE", "ACTIVE"))
"""
    for name in ("gcloud", "sbatch"):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def recorded() -> list[list[str]]:
        if not calls.exists():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return env, recorded


def test_dry_run_runs_nothing(fake_tools, tmp_path):
    env, recorded = fake_tools
    env["TMPDIR"] = str(tmp_path)
    base = ["--tpu", "t", "--zone", "z", "--num_slices", "2"]
    for sub in ("create", "status", "wait", "install", "train", "logs", "stop", "delete"):
        extra = ["--accelerator", "v5p-8", "--runtime", "r"] if sub == "create" else []
        assert tpu(sub, *base, *extra, env=env)
    sh(SUBMIT_SH, "--dry-run", env=env)
    assert recorded() == []
    assert not (tmp_path / "spectron-jax-src.tar.gz").exists()


def test_real_runs_call_what_dry_run_printed(fake_tools):
    env, recorded = fake_tools
    args = ["train", "--tpu", "pod", "--zone", "z", "--num_slices", "2", "--", *TRAIN_FLAGS]
    printed = tpu(*args, env=env)
    sh(TPU_SH, *args, env=env)
    # The real run looked slice 0 worker 0's address up (the stand-in answers 10.1.2.3).
    assert recorded() == [[w.replace("SLICE0_WORKER0_IP", "10.1.2.3") for w in c] for c in printed]
    assert start_words(recorded()[2])[1] == "MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8080"

    dry_wait = tpu("wait", "--tpu", "t", "--zone", "z", env=env)
    before = len(recorded())
    assert sh(TPU_SH, "wait", "--tpu", "t", "--zone", "z", env=env).returncode == 0
    assert recorded()[before:] == dry_wait
    failed = sh(
        TPU_SH,
        "wait",
        "--tpu",
        "t",
        "--zone",
        "z",
        check=False,
        env={**env, "FAKE_QR_STATE": "FAILED"},
    )
    assert failed.returncode == 1 and "FAILED" in failed.stdout

    submit = ["--nodes", "2", "--env", XLA, "--", *TRAIN_FLAGS]
    [dry_sbatch] = commands(sh(SUBMIT_SH, *dry(submit), env=env).stdout)
    before = len(recorded())
    out = sh(SUBMIT_SH, *submit, env=env).stdout
    assert recorded()[before:] == [dry_sbatch[2:]]  # what `env XLA_FLAGS=...` then runs
    assert out.strip() == XLA  # and sbatch saw the variable


def exited(pid: int) -> bool:
    """Gone, or a zombie (where PID 1 does not reap, as in some containers)."""
    ps = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    stat = ps.stdout.strip()
    return stat == "" or stat.startswith("Z")


def wait_for(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@needs_setsid
def test_train_command_reaches_the_trainer_intact_through_the_worker_shell(tmp_path):
    """Each slice's --command, run by bash as gcloud's ssh would run it on a worker, starts the
    trainer (here a stand-in that writes down its argv and environment) with the train flags
    and that slice's MEGASCALE_* values."""
    repo = tmp_path / "repo"
    (repo / "launch/tpu").mkdir(parents=True)
    shutil.copy(WORKER_SH, repo / "launch/tpu/worker.sh")
    trainer = tmp_path / "trainer"
    trainer.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith(('MEGASCALE_', 'XLA_'))}\n"
        "name = 'ran-' + env.get('MEGASCALE_SLICE_ID', 'x') + '.json'\n"
        "open(name, 'w').write(json.dumps({'argv': sys.argv[1:], 'env': env}))\n"
    )
    trainer.chmod(0o755)
    cmds = tpu(
        "train",
        "--tpu",
        "pod",
        "--zone",
        "z",
        "--num_slices",
        "2",
        "--coordinator",
        "10.0.0.5",
        "--repo_dir",
        str(repo),
        "--python",
        str(trainer),
        "--env",
        XLA,
        "--no_follow",
        "--",
        *TRAIN_FLAGS,
    )
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGASCALE_", "XLA_"))}
    for i, ssh in enumerate(cmds):
        out = subprocess.run(
            ["bash", "-c", value(ssh, "--command")],
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "started pid" in out.stdout
        ran = repo / f"ran-{i}.json"
        wait_for(ran.exists, ran.name)
        wait_for(lambda: exited(int((repo / "train.pid").read_text())), "the trainer to exit")
        assert json.loads(ran.read_text()) == {
            "argv": ["-m", "spectron_jax.train", "--distributed", *TRAIN_FLAGS],
            "env": {
                "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.5:8080",
                "MEGASCALE_NUM_SLICES": "2",
                "MEGASCALE_SLICE_ID": str(i),
                "MEGASCALE_PORT": "8080",
                "XLA_FLAGS": XLA.split("=", 1)[1],
            },
        }
    log = (repo / "train.log").read_text().splitlines()
    assert sum(line.startswith("== ") for line in log) == 2  # a header line per start


@needs_setsid
def test_worker_starts_detached_refuses_a_second_run_and_stops_with_sigterm(tmp_path):
    code = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path('got').write_text('TERM'),"
        " sys.exit(0)))\n"
        "pathlib.Path('ready').write_text('1')\n"
        "print('training', flush=True)\n"
        "time.sleep(60)\n"
    )
    start = sh(WORKER_SH, "start", sys.executable, "-c", code, cwd=tmp_path)
    pid = int((tmp_path / "train.pid").read_text())
    try:
        assert f"started pid {pid}" in start.stdout
        wait_for((tmp_path / "ready").exists, "the run to start")
        again = sh(WORKER_SH, "start", "true", cwd=tmp_path, check=False)
        assert again.returncode == 1 and "already running" in again.stderr
        stop = sh(WORKER_SH, "stop", cwd=tmp_path)
        assert f"stopped pid {pid}" in stop.stdout
        assert (tmp_path / "got").read_text() == "TERM" and exited(pid)
        assert "training" in (tmp_path / "train.log").read_text()
        assert "no training running" in sh(WORKER_SH, "stop", cwd=tmp_path).stdout
        assert sh(WORKER_SH, "frobnicate", cwd=tmp_path, check=False).returncode == 2
    finally:
        if not exited(pid):
            os.kill(pid, 9)
