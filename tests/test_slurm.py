"""A real SLURM on this machine (slurmctld + slurmd on localhost, munge, a generated slurm.conf):
`tools/slurm_train.sh` trains with 2 srun tasks (gloo), evaluates with 2 tasks, and a job stopped
with SIGTERM, then near its "time limit" (USR1 to the batch shell, as --signal=B:USR1@120 sends),
requeues itself twice, resumes and ends with the weights of the uninterrupted job.

Needs root and Debian's slurm-wlm (`apt-get install slurm-wlm`); skipped, saying which, without
(a failure instead when REQUIRE_SLURM_TEST=1, as in CI).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port

from lib.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "scancel", "squeue")
MAX_ITER = 10
JOB_TIMEOUT = 900  # seconds for one job; the CPU may be shared with other work


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _first_job_id() -> int:
    """The trainer's port is 10000 + job id % 50000: start the job ids where the ports of the
    test's three jobs are free."""
    while True:
        port = free_port(10001, 59990)
        if all(_is_free(port + i) for i in range(3)):
            return port - 10000


def _node_hardware() -> str:
    """CPUs, sockets, cores and threads as slurmd detects them (the node is refused otherwise)."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
    fields = [f for f in line.split() if f.split("=")[0] in
              ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")]
    return " ".join(fields)


class Cluster:
    """The SLURM commands, pointed at the generated configuration."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}\n"
                                 + self.daemon_logs())
        return proc.stdout

    def daemon_logs(self) -> str:
        logs = [f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log"))]
        return "\n".join(logs)

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def submit(self, *args: str, runs_dir: Path) -> int:
        """Submit through tools/slurm_train.sh (NODES=1, 2 tasks, CPU); return the job id."""
        out = subprocess.run(["bash", str(REPO / "tools/slurm_train.sh"), "1", "2",
                              f"--output={self.root}/job-%j.out", *args, "--device", "cpu"],
                             env={**self.env, "RUNS_DIR": str(runs_dir)}, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return int(re.search(r"Submitted batch job (\d+)", out.stdout)[1])

    def output(self, job_id: int) -> Path:
        return self.root / f"job-{job_id}.out"

    def wait_until_done(self, job_id: int) -> dict[str, str]:
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                return job
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {job['JobState']} after {JOB_TIMEOUT} s:\n"
                             + self._log(job_id))

    def wait_for_line(self, job_id: int, pattern: str, start: int = 0) -> tuple[re.Match, int]:
        """The first match of ``pattern`` in the job's output after offset ``start``, and the
        offset where it ends."""
        deadline = time.monotonic() + JOB_TIMEOUT
        path = self.output(job_id)
        while time.monotonic() < deadline:
            ended = self.job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
            text = path.read_text() if path.exists() else ""  # read after the state: complete
            match = re.compile(pattern, re.MULTILINE).search(text, start)
            if match:
                return match, match.end()
            if ended:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in job {job_id}'s output:\n" + self._log(job_id))

    def _log(self, job_id: int) -> str:
        path = self.output(job_id)
        return (path.read_text() if path.exists() else "(no output)") + "\n" + self.daemon_logs()


def _stop(pid_file: Path, timeout: float = 30) -> None:
    """Stop the daemon whose pid is in ``pid_file`` (one we started): SIGTERM, then SIGKILL."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # CI sets REQUIRE_SLURM_TEST=1: there a missing SLURM is a failure, not a skip
    give_up = pytest.fail if os.environ.get("REQUIRE_SLURM_TEST") == "1" else pytest.skip
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        give_up(f"SLURM is not installed ({', '.join(missing)} missing): "
                "apt-get install slurm-wlm")
    if os.geteuid() != 0:
        give_up("starting slurmd needs root (it runs the jobs as their users)")
    root = tmp_path_factory.mktemp("slurm")
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    socket_path = root / "munge.socket"
    ctld_port, node_port = free_port(), free_port()
    first_job_id = _first_job_id()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=bisenettest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s)
AuthInfo=socket={socket_path},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
FirstJobId={first_job_id}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MASTER_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    slurm = Cluster(root, env)
    try:
        subprocess.run(["munged", "--force", f"--socket={socket_path}", f"--key-file={key}",
                        f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                        f"--seed-file={root}/munged.seed"], check=True, timeout=30)
        subprocess.run(["slurmctld", "-i"], env=env, check=True, timeout=30)
        subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 60
        while "State=IDLE" not in slurm.run("scontrol", "show", "node", "localhost", check=False):
            if time.monotonic() > deadline:
                raise AssertionError("the node never became idle:\n" + slurm.daemon_logs())
            time.sleep(0.5)
        yield slurm
    finally:
        subprocess.run(["scancel", "--partition=debug"], env=env, capture_output=True,
                       timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "--noheader"], env=env, capture_output=True, text=True,
                timeout=30).stdout.strip():
            time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld", "munged"):
            _stop(root / f"{daemon}.pid")


@pytest.fixture(scope="module")
def toy_root(make_toy):
    return make_toy(n_val=3)  # 3 images over 2 evaluation tasks: an uneven share


def _train_options(toy_root: Path) -> list[str]:
    return ["bisenetv2/train.py", "--data-root", str(toy_root), "--crop-size", "64", "128",
            "--max-iter", str(MAX_ITER), "--warmup-iter", "1", "--batch-size", "4",
            "--num-workers", "0", "--log-every", "1", "--checkpoint-every", "4",
            "--no-eval-at-end"]


@pytest.mark.parametrize(("args", "named"), [
    (["--time=5", "no_such/train.py"], "no_such/train.py"),
    (["--partition", "gpu", "bisenetv2/train.py"], "gpu"),  # a separate value is no option
    (["--time=5"], "(none)"),
])
def test_submission_refuses_a_missing_script_naming_it(args, named):
    # checked before sbatch is called, so this runs without SLURM
    out = subprocess.run(["bash", str(REPO / "tools/slurm_train.sh"), "1", "2", *args],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2
    assert f"{named}: no such script in {REPO}" in out.stderr, out.stderr


def _table(text: str) -> list[str]:
    """The lines of every per-class IoU table in ``text``."""
    return [line for line in text.splitlines() if line.startswith("|")]


def test_train_evaluate_and_requeue_on_slurm(cluster, toy_root, tmp_path):
    runs = tmp_path / "runs"
    # 1. an uninterrupted 2-task training job
    reference_id = cluster.submit(*_train_options(toy_root), runs_dir=runs)
    job = cluster.wait_until_done(reference_id)
    log = cluster.output(reference_id).read_text()
    assert (job["JobState"], job["ExitCode"], job["NumTasks"]) == ("COMPLETED", "0:0", "2"), log
    assert "2 process(es) on cpu, 2 images per process per iteration" in log
    reference = load_checkpoint(runs / f"slurm-{reference_id}" / "model_final.pth")
    assert reference["iteration"] == MAX_ITER

    # 2. the same run, stopped with SIGTERM to its tasks: it checkpoints and requeues itself
    job_id = cluster.submit(*_train_options(toy_root), runs_dir=runs)
    run_dir = runs / f"slurm-{job_id}"
    _, end = cluster.wait_for_line(job_id, rf"iter 3/{MAX_ITER}")
    cluster.run("scancel", "--signal=TERM", str(job_id))
    stop, end = cluster.wait_for_line(job_id, r"stopping after iteration (\d+)", end)
    first_stop = int(stop[1])
    _, end = cluster.wait_for_line(job_id, rf"requeueing job {job_id}$", end)
    _, end = cluster.wait_for_line(job_id, rf"job {job_id} \(restart 1\)", end)
    resumed, end = cluster.wait_for_line(job_id, r"resumed from (\S+) at iteration (\d+)", end)
    assert int(resumed[2]) == first_stop and Path(resumed[1]).parent == run_dir

    # 3. near the time limit SLURM sends USR1 to the batch shell: same checkpoint and requeue
    _, end = cluster.wait_for_line(job_id, rf"iter {first_stop + 2}/{MAX_ITER}", end)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))
    stop, end = cluster.wait_for_line(job_id, r"stopping after iteration (\d+)", end)
    second_stop = int(stop[1])
    assert first_stop + 2 <= second_stop < MAX_ITER
    _, end = cluster.wait_for_line(job_id, rf"job {job_id} \(restart 2\)", end)
    resumed, end = cluster.wait_for_line(job_id, r"resumed from \S+ at iteration (\d+)", end)
    assert int(resumed[1]) == second_stop

    job = cluster.wait_until_done(job_id)
    log = cluster.output(job_id).read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "2"), log
    assert "Traceback" not in log
    final = load_checkpoint(run_dir / "model_final.pth")
    assert final["iteration"] == reference["iteration"] == MAX_ITER
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key

    # 4. evaluation with 2 tasks prints, once, the table of a single-process evaluate.py
    ckpt = str(run_dir / "model_final.pth")
    eval_id = cluster.submit("evaluate.py", "--ckpt", ckpt, "--data-root", str(toy_root),
                             "--num-workers", "0", runs_dir=runs)
    job = cluster.wait_until_done(eval_id)
    log = cluster.output(eval_id).read_text()
    assert (job["JobState"], job["ExitCode"], job["NumTasks"]) == ("COMPLETED", "0:0", "2"), log
    single = subprocess.run([sys.executable, "evaluate.py", "--ckpt", ckpt, "--data-root",
                             str(toy_root), "--num-workers", "0", "--device", "cpu"], cwd=REPO,
                            env=cluster.env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    table = _table(single.stdout)
    # the per-class table (header, rule, 19 classes, mIoU), then the table of the other scores
    assert table[2 + 19].startswith("| mIoU") and table[-1].startswith("| micro F1")
    assert _table(log) == table  # once: rank 1 did not print a table of its own
