"""tpu_scripts/: syntax, shellcheck, dry runs, argument errors, and real runs against fake
gcloud / ssh / curl binaries that execute the "remote" commands on local fake workers."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "tpu_scripts"
SCRIPTS = sorted(SCRIPTS_DIR.glob("*.sh"))
COMMANDS = [s for s in SCRIPTS if s.name != "common.sh"]
EXPECTED = {
    "aot_check.sh",
    "common.sh",
    "create.sh",
    "delete.sh",
    "gpu_launch.sh",
    "launch.sh",
    "setup.sh",
    "watch.sh",
}
TPU = ["--name", "run1", "--zone", "us-east5-a"]

# Stand-ins for the cloud tools. gcloud logs each call to $FAKE_CALLS, keeps the queued resource's
# state in $FAKE_STATE and runs `tpu-vm ssh --command` on workers 0..$FAKE_WORKERS-1 in $HOME.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$3 $4" >> "$FAKE_CALLS"
cmd="" workers=0
for arg in "$@"; do
  case $prev in --command) cmd=$arg ;; esac
  case $arg in
    --worker=all) workers=$(seq 0 $((FAKE_WORKERS - 1))) ;;
    --worker=*) workers=${arg#*=} ;;
  esac
  prev=$arg
done
case "$3 $4" in
  "queued-resources describe") [ -f "$FAKE_STATE" ] && cat "$FAKE_STATE" || exit 1 ;;
  "queued-resources create") echo ACTIVE > "$FAKE_STATE" ;;
  "queued-resources delete") rm -f "$FAKE_STATE" ;;
  "tpu-vm scp") ;;
  "tpu-vm ssh")
    case $cmd in *msjax-train*) ;; *) exit 0 ;; esac
    # A preemption: this launch fails and the queued resource is suspended.
    if [ -f "$FAKE_PREEMPT_ONCE" ]; then
      rm "$FAKE_PREEMPT_ONCE"; echo SUSPENDED > "$FAKE_STATE"; exit 255
    fi
    rc=0
    for w in $workers; do (cd "$HOME" && FAKE_WORKER=$w bash -c "$cmd") || rc=$?; done
    exit $rc ;;
esac
"""
FAKE_CURL = '#!/usr/bin/env bash\necho "${FAKE_WORKER:-0}"\n'
# ssh [-o OPT]... HOST COMMAND: run COMMAND in $HOME/HOST.
FAKE_SSH = r"""#!/usr/bin/env bash
while [ "$1" = -o ]; do shift 2; done
host=$1
mkdir -p "$HOME/$host/msjax/.venv/bin"
cp "$HOME/msjax/.venv/bin/msjax-train" "$HOME/$host/msjax/.venv/bin/"
cd "$HOME/$host" && bash -c "$2"
"""
# Fails on worker/process $FAKE_FAIL with exit 3; reports its arguments and jax env otherwise.
FAKE_TRAIN = r"""#!/usr/bin/env bash
id=${FAKE_WORKER:-${MSJAX_PROCESS_ID:-0}}
echo "train[$id] args: $*"
echo "train[$id] env: $MSJAX_COORDINATOR_ADDRESS $MSJAX_NUM_PROCESSES ${MSJAX_PROCESS_ID:-}"
if [ "$id" = "${FAKE_FAIL:-none}" ]; then echo "train[$id] boom" >&2; exit 3; fi
"""


def _write_exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake(tmp_path):
    """Env with fake gcloud/curl/ssh first on PATH and a fake msjax install in $HOME."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
    _write_exe(bin_dir / "curl", FAKE_CURL)
    _write_exe(bin_dir / "ssh", FAKE_SSH)
    _write_exe(home / "msjax/.venv/bin/msjax-train", FAKE_TRAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSJAX_", "FAKE_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        HOME=str(home),
        FAKE_CALLS=str(tmp_path / "calls"),
        FAKE_STATE=str(tmp_path / "state"),
        FAKE_PREEMPT_ONCE=str(tmp_path / "preempt"),
        FAKE_WORKERS="2",
    )
    return env


def run(script: str, *args: str, env: dict | None = None, cwd: Path | None = None):
    """Run tpu_scripts/<script> with bash; returns the CompletedProcess (text)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSJAX_")}
    return subprocess.run(
        ["bash", str(SCRIPTS_DIR / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def dry(script: str, *args: str, **kw) -> list[list[str]]:
    """Dry-run a script; its printed commands, each split into words like a shell would."""
    proc = run(script, "--dry-run", *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]


def remote_command(words: list[str]) -> str:
    """The --command value of a gcloud ssh command; checks it is valid bash."""
    cmd = words[words.index("--command") + 1]
    check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert check.returncode == 0, f"remote command is not valid bash: {check.stderr}\n{cmd}"
    return cmd


def test_all_scripts_present():
    assert {s.name for s in SCRIPTS} == EXPECTED
    assert all(os.access(s, os.X_OK) for s in COMMANDS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", COMMANDS, ids=lambda p: p.name)
def test_help(script):
    proc = run(script.name, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:")
    assert "--dry-run" in proc.stdout


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("create.sh", ["--zone", "z", "--accelerator", "v4-8"], "missing --name"),
        ("create.sh", ["--name", "a", "--accelerator", "v4-8"], "missing --zone"),
        ("create.sh", TPU, "missing --accelerator"),
        ("create.sh", [*TPU, "--accelerator", "v9-8"], "accelerator 'v9-8' is not a TPU type"),
        ("create.sh", [*TPU, "--accelerator"], "option --accelerator needs a value"),
        ("delete.sh", [*TPU, "--bogus"], "unknown option '--bogus'"),
        ("setup.sh", [*TPU, "--repo", "u", "--source", "."], "--source or --repo, not both"),
        ("setup.sh", [*TPU, "--source", "/"], "is not a git checkout of msjax"),
        ("aot_check.sh", ["--config", "c.py"], "missing --topology"),
        ("aot_check.sh", ["--topology", "v5p-8", "--config", "c", "--on-worker"], "missing --name"),
        ("launch.sh", [*TPU, "--workdir", "gs://b/r"], "missing --config"),
        ("launch.sh", [*TPU, "--config", "c.py"], "missing --workdir"),
        ("launch.sh", [*TPU, "--config", "c", "--workdir", "w", "--env", "1A=b"], "KEY=VALUE"),
        ("watch.sh", [*TPU, "--config", "c", "--workdir", "w"], "missing --accelerator"),
        ("watch.sh", [*TPU, "--accelerator", "v4-8", "--workdir", "w"], "missing --config"),
        ("gpu_launch.sh", ["--config", "c", "--workdir", "w"], "missing --hosts"),
        ("gpu_launch.sh", ["--hosts", "a,,b", "--config", "c", "--workdir", "w"], "empty entry"),
        ("gpu_launch.sh", ["--hostfile", "/nonexistent"], "cannot read it"),
    ],
)
def test_bad_arguments_fail_with_a_message(script, args, message):
    proc = run(script, *args, "--dry-run")
    assert proc.returncode == 2
    assert message in proc.stderr and "error:" in proc.stderr


def test_dry_run_never_calls_gcloud(fake, tmp_path):
    _write_exe(tmp_path / "bin/gcloud", '#!/bin/sh\necho called >> "$FAKE_CALLS"; exit 99\n')
    for script, args in [
        ("create.sh", [*TPU, "--accelerator", "v4-8"]),
        ("delete.sh", TPU),
        ("setup.sh", TPU),
        ("launch.sh", [*TPU, "--config", "c", "--workdir", "gs://b/r"]),
        ("watch.sh", [*TPU, "--accelerator", "v4-8", "--config", "c", "--workdir", "gs://b/r"]),
        ("aot_check.sh", [*TPU, "--config", "c", "--topology", "v4-8", "--on-worker"]),
    ]:
        assert dry(script, *args, env=fake)
    assert not (tmp_path / "calls").exists()


def test_missing_gcloud_is_a_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "basename", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = run("delete.sh", *TPU, env={"PATH": str(bin_dir)})
    assert proc.returncode == 2 and "gcloud not found" in proc.stderr


def test_create_dry_run():
    [cmd] = dry("create.sh", *TPU, "--accelerator", "v5e-16", "--spot", "--project=p1")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"run1", "--node-id=run1", "--zone=us-east5-a", "--project=p1", "--spot"} <= set(cmd)
    assert {"--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite"} <= set(cmd)

    [cmd] = dry("create.sh", *TPU, "--accelerator", "v6e-8", "--on-demand")
    assert "--accelerator-type=v6e-8" in cmd and "--runtime-version=v2-alpha-tpuv6e" in cmd
    assert "--spot" not in cmd and not any(w.startswith("--project") for w in cmd)

    cmds = dry("create.sh", *TPU, "--accelerator=v4-32", "--runtime=custom-rt", "--wait")
    assert "--runtime-version=custom-rt" in cmds[0]
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]


def test_name_and_zone_from_env():
    env = {**os.environ, "MSJAX_TPU_NAME": "envtpu", "MSJAX_TPU_ZONE": "europe-west4-a"}
    [cmd] = dry("delete.sh", env=env)
    assert cmd[4:8] == ["delete", "envtpu", "--zone=europe-west4-a", "--force"]


def test_setup_dry_run_copies_the_checkout(tmp_path):
    cmds = dry("setup.sh", *TPU, "--dir", "code/msjax")
    pack, scp, ssh = cmds
    assert pack[:2] == ["git", "-C"] and "ls-files" in pack
    assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[3:6] == ["tpu-vm", "ssh", "run1"] and "--worker=all" in ssh
    cmd = remote_command(ssh)
    assert "tar -xzf msjax-src.tar.gz -C code/msjax" in cmd
    assert 'pip install -q -c constraints.txt -e ".[tpu]"' in cmd and "python3.11 -m venv" in cmd


def test_setup_dry_run_clones_a_repo():
    [ssh] = dry("setup.sh", *TPU, "--repo", "https://example.org/msjax.git", "--ref", "v1")
    cmd = remote_command(ssh)
    assert "git clone -q https://example.org/msjax.git msjax" in cmd
    assert "fetch -q origin v1" in cmd and ".[tpu]" in cmd


def test_aot_check_dry_run():
    [cmd] = dry("aot_check.sh", "--config", "exp/c.py", "--topology", "v5p-64", "--", "--json")
    assert cmd == ["msjax-aot", "--config", "exp/c.py", "--topology", "v5p-64", "--json"]
    [ssh] = dry("aot_check.sh", *TPU, "--config", "c.py", "--topology", "v6e-8", "--on-worker")
    assert "--worker=0" in ssh
    assert remote_command(ssh) == "cd msjax && .venv/bin/msjax-aot --config c.py --topology v6e-8"


def test_launch_dry_run():
    args = [*TPU, "--config", "exp/r.py", "--workdir", "gs://bkt/run 1", "--env", "A=x y"]
    proc = run("launch.sh", *args, "--dry-run", "--", "--config.rl.spr_threshold=0.6")
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.endswith("2>&1 | tee -a logs/run1.log")
    ssh = shlex.split(line.rsplit(" 2>&1 | tee", 1)[0])
    assert ssh[3:6] == ["tpu-vm", "ssh", "run1"] and "--worker=all" in ssh
    cmd = remote_command(ssh)
    train = "env 'A=x y' .venv/bin/msjax-train --config exp/r.py '--config.workdir=gs://bkt/run 1'"
    assert f"{train} --config.rl.spr_threshold=0.6" in cmd and "warning" not in proc.stderr

    proc = run("launch.sh", *TPU, "--config", "c", "--workdir", "/tmp/run", "--dry-run")
    assert proc.returncode == 0 and "is not a gs:// path" in proc.stderr


def test_launch_runs_on_every_worker(fake, tmp_path):
    args = [*TPU, "--config", "c.py", "--workdir", "gs://b/r", "--log-dir", str(tmp_path / "l")]
    proc = run("launch.sh", *args, "--", "--config.seed=1", env=fake)
    assert proc.returncode == 0, proc.stderr
    # Worker 0 streams to the console and the local log; every worker logs on its own disk.
    assert "train[0] args: --config c.py --config.workdir=gs://b/r --config.seed=1" in proc.stdout
    assert "train[1]" not in proc.stdout
    assert "train[0] args" in (tmp_path / "l/run1.log").read_text()
    logs = Path(fake["HOME"]) / "msjax/logs"
    assert "train[1] args" in (logs / "train-worker1.log").read_text()
    assert "train[0] args" in (logs / "train-worker0.log").read_text()

    proc = run("launch.sh", *args, env={**fake, "FAKE_FAIL": "1"})
    assert proc.returncode == 3
    assert (
        "[worker 1] msjax-train failed (exit 3)" in proc.stdout and "train[1] boom" in proc.stdout
    )


def test_watch_dry_run_shows_one_round():
    args = [*TPU, "--accelerator", "v5p-64", "--spot", "--config", "c.py", "--workdir", "gs://b/r"]
    cmds = dry("watch.sh", *args, "--repo", "https://x/m.git", "--", "--config.seed=2")
    verbs = [" ".join(c[3:5]) for c in cmds]
    assert verbs == [
        "queued-resources describe",
        "queued-resources delete",
        "queued-resources create",
        "queued-resources describe",
        "tpu-vm ssh",
        "tpu-vm ssh",
    ]
    assert "--spot" in cmds[2] and "--accelerator-type=v5p-64" in cmds[2]
    assert "git clone" in remote_command(cmds[4])
    assert "--config.workdir=gs://b/r --config.seed=2" in " ".join(cmds[5])


def test_watch_recreates_the_tpu_after_preemption(fake, tmp_path):
    (tmp_path / "preempt").touch()
    args = [*TPU, "--accelerator", "v4-16", "--config", "c.py", "--workdir", "gs://b/r"]
    proc = run(
        "watch.sh", *args, "--repo", "https://x/m.git", "--poll", "1", env=fake, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().split("\n")[:-1]
    round1 = ["queued-resources describe", "queued-resources create", "queued-resources describe"]
    round1 += ["tpu-vm ssh", "tpu-vm ssh"]  # setup, launch (preempted)
    round2 = ["queued-resources describe"] * 2 + ["queued-resources delete", *round1[1:]]
    assert calls == round1 + round2
    assert "preempted" in proc.stderr and "msjax-train finished" in proc.stderr
    assert "train[0] args: --config c.py --config.workdir=gs://b/r" in proc.stdout
    assert "train[0] args" in (tmp_path / "logs/run1.log").read_text()


def test_watch_gives_up_on_repeated_failures(fake, tmp_path):
    (tmp_path / "state").write_text("ACTIVE\n")
    args = [*TPU, "--accelerator", "v4-16", "--config", "c.py", "--workdir", "gs://b/r"]
    env = {**fake, "FAKE_FAIL": "0"}
    proc = run(
        "watch.sh", *args, "--no-setup", "--max-restarts", "1", "--poll", "1", env=env, cwd=tmp_path
    )
    assert proc.returncode == 2 and "giving up" in proc.stderr
    calls = (tmp_path / "calls").read_text().split("\n")[:-1]
    assert calls.count("tpu-vm ssh") == 2  # two launches, no setup


def test_gpu_launch_dry_run_and_printed_commands(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nalice@gpu-a\n\ngpu-b  # second\ngpu-c\n")
    args = ["--hostfile", str(hostfile), "--config", "c.py", "--workdir", "/nfs/run", "--port=9000"]
    proc = run("gpu_launch.sh", *args, "--dry-run", "--", "--config.seed=4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[0].endswith("| tee logs/host0.log &")
    for i, (line, host) in enumerate(zip(lines, ["alice@gpu-a", "gpu-b", "gpu-c"], strict=True)):
        words = shlex.split(line.split(" 2>&1")[0].split(" > ")[0])
        assert words[:4] == ["ssh", "-o", "BatchMode=yes", host]
        env = f"MSJAX_COORDINATOR_ADDRESS=gpu-a:9000 MSJAX_NUM_PROCESSES=3 MSJAX_PROCESS_ID={i}"
        assert words[4] == (
            f"cd msjax && env {env} .venv/bin/msjax-train --config c.py "
            "--config.workdir=/nfs/run --config.seed=4"
        )

    proc = run(
        "gpu_launch.sh", "--hosts", "h0,h1", "--coordinator", "10.0.0.5:1234", "--config", "c",
        "--workdir", "w", "--print-commands",
    )  # fmt: skip
    assert proc.stdout.splitlines()[::2] == ["# host 0: h0", "# host 1: h1"]
    assert (
        "MSJAX_COORDINATOR_ADDRESS=10.0.0.5:1234 MSJAX_NUM_PROCESSES=2 MSJAX_PROCESS_ID=1"
        in (proc.stdout.splitlines()[3])
    )


def test_gpu_launch_runs_one_process_per_host(fake, tmp_path):
    logs = tmp_path / "l"
    args = ["--hosts", "h0,h1", "--config", "c.py", "--workdir", "/nfs/r", "--log-dir", str(logs)]
    proc = run("gpu_launch.sh", *args, env=fake)
    assert proc.returncode == 0, proc.stderr
    assert "train[0] env: h0:8476 2 0" in proc.stdout
    assert "train[1] env: h0:8476 2 1" in (logs / "host1.log").read_text()
    assert (
        "train[0] args: --config c.py --config.workdir=/nfs/r" in (logs / "host0.log").read_text()
    )

    proc = run("gpu_launch.sh", *args, env={**fake, "FAKE_FAIL": "1"})
    assert proc.returncode == 1 and "host 1 (h1) exited with status 3" in proc.stderr
