"""Launcher environments: SLURM's compressed host lists, which launcher's variables win, and two
real processes that form a gloo group from SLURM's variables alone (no SLURM daemon needed)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lib.common.distributed import Launch, expand_hostlist, resolve_launch, slurm_master_port

REPO = Path(__file__).resolve().parents[1]

# written by hand from SLURM's hostlist rules (the zero padding of the first bound is kept)
HOSTLISTS = {
    "gpu5": ["gpu5"],
    "node[01-03,07],gpu5": ["node01", "node02", "node03", "node07", "gpu5"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "n[1-10]": [f"n{i}" for i in range(1, 11)],
    "r[1-2]n[1-2]": ["r1n1", "r1n2", "r2n1", "r2n2"],
    "a,b[3],c[5-6]": ["a", "b3", "c5", "c6"],
    "gpu-[7,009-010]": ["gpu-7", "gpu-009", "gpu-010"],
}


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_hostlist_expansion(hostlist):
    assert expand_hostlist(hostlist) == HOSTLISTS[hostlist]


def test_hostlist_agrees_with_scontrol(tmp_path):
    """A second implementation: SLURM's own ``scontrol show hostnames``, where it is installed."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (apt-get install slurm-wlm)")
    conf = tmp_path / "slurm.conf"  # scontrol reads a configuration even to expand a host list
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\n")
    for hostlist in HOSTLISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True,
                             text=True, env={**os.environ, "SLURM_CONF": str(conf)}, check=True)
        assert expand_hostlist(hostlist) == out.stdout.split(), hostlist


@pytest.mark.parametrize("bad", ["", "a,,b", "n[1-2", "n]", "n[]", "n[3-1]", "n[a-b]",
                                 "n[1[2]]"])
def test_bad_hostlist_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=f"host list {bad!r}".replace("[", r"\[")):
        expand_hostlist(bad)


SLURM_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5",
              "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gn[04-07]"}


def test_slurm_task_variables():
    # port: 10000 + 123456 % 50000 = 10000 + 23456
    assert resolve_launch(SLURM_TASK) == Launch("slurm", rank=5, world_size=8, local_rank=1,
                                                master_addr="gn04", master_port=33456)


def test_master_port_spreads_job_ids_over_a_fixed_range():
    ports = [slurm_master_port(job_id) for job_id in range(0, 200_000, 7)]
    assert min(ports) == 10000 and max(ports) <= 59999
    assert slurm_master_port(49_999) == 59999 and slurm_master_port(50_000) == 10000


def test_explicit_master_address_and_port_and_step_nodelist_win():
    env = {**SLURM_TASK, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29555"}
    launch = resolve_launch(env)
    assert (launch.master_addr, launch.master_port) == ("10.0.0.9", 29555)
    # a step on part of the allocation: rank 0 runs on the step's first node
    launch = resolve_launch({**SLURM_TASK, "SLURM_STEP_NODELIST": "gn[06-07]"})
    assert launch.master_addr == "gn06"


def test_slurm_task_without_host_list_or_job_id_says_what_to_set():
    no_nodes = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST: set MASTER_ADDR"):
        resolve_launch(no_nodes)
    assert resolve_launch({**no_nodes, "MASTER_ADDR": "10.0.0.9"}).master_addr == "10.0.0.9"
    no_job = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_JOB_ID"}
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID: set MASTER_PORT"):
        resolve_launch(no_job)
    assert resolve_launch({**no_job, "MASTER_PORT": "29555"}).master_port == 29555


def test_torchrun_takes_precedence_over_slurm():
    # torchrun started by srun (one per node) exports RANK for each of its workers
    env = {**SLURM_TASK, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    assert resolve_launch(env) == Launch("torchrun", rank=3, world_size=16, local_rank=3)


def test_batch_script_and_plain_runs_are_single_processes():
    # the batch script has SLURM_PROCID/NTASKS/LOCALID but no srun step: one process
    batch = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_ID"}
    assert resolve_launch(batch) == Launch("none")
    assert resolve_launch({}) == Launch("none")
    assert resolve_launch({"PATH": "/usr/bin"}).world_size == 1


_WORKER = """
import torch
from lib.common import distributed
info = distributed.init_distributed("cpu")
total = distributed.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
print(info.rank, info.world_size, info.local_rank, distributed.get_world_size(), int(total))
distributed.cleanup_distributed()
"""


def _slurm_env(rank: int, ntasks: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_")) and k not in ("RANK", "WORLD_SIZE")}
    # the port is derived from the job id: choose an id whose port is free
    return {**env, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": str(port - 10000),
            "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks),
            "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost"}


def _free_port_in_slurm_range() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 10000 <= port < 60000:  # reachable as 10000 + job_id % 50000
            return port


def test_two_slurm_tasks_form_a_gloo_group():
    port = _free_port_in_slurm_range()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], cwd=REPO, text=True,
                              env=_slurm_env(rank, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for rank in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # rank, world size, local rank, the process group's size, 1 + 2 summed over the group
    assert [o.split()[-5:] for o in outs] == [["0", "2", "0", "2", "3"], ["1", "2", "1", "2", "3"]]


def test_one_slurm_task_runs_without_a_process_group():
    out = subprocess.run([sys.executable, "-c", _WORKER], cwd=REPO, text=True, timeout=120,
                         env=_slurm_env(0, 1, 10001), capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-5:] == ["0", "1", "0", "1", "1"]
