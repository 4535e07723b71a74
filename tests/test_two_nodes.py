"""Several nodes: two torchrun launchers (--nnodes 2, one process each, rendezvous on this machine) train
as two processes on one node do; the data is fetched by one process at a time and checked once per run."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing

import dataset
import distributed
from tests.test_distributed import REPOSITORY, SIZES, assert_same_metrics, free_port, metrics, run_flags, torchrun

# Three ranks on two nodes: ranks 0 and 1 on node 0, rank 2 on node 1 (LOCAL_RANK 0, 1, 0).
LOCAL_RANKS = (0, 1, 0)


def _in_process_group(rank, port, log_path, failing_rank, results_path):
    """One rank of a gloo group: runs the helpers under test and writes what they did or raised."""
    os.environ["LOCAL_RANK"] = str(LOCAL_RANKS[rank])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(LOCAL_RANKS))

    def fetch():
        with open(log_path, "a") as log:
            log.write(f"start {rank}\n")
        time.sleep(0.3)  # long enough for a rank that does not wait to start meanwhile
        if rank == failing_rank:
            raise dataset.DatasetUnavailableError(f"--data_path: rank {rank} could not fetch the data")
        with open(log_path, "a") as log:
            log.write(f"end {rank}\n")
        return rank

    def check():
        with open(log_path, "a") as log:
            log.write(f"check {rank}\n")
        if failing_rank is not None:
            raise dataset.DatasetUnavailableError("--data_path: val/x.png is not a readable image")

    outcomes = []
    for helper in (lambda: distributed.rank_zero_first(fetch), lambda: distributed.on_rank_zero(check)):
        try:
            outcomes.append(f"returned {helper()}")
        except dataset.DatasetUnavailableError as error:
            outcomes.append(f"raised {error}")
    with open(f"{results_path}.{rank}", "w") as handle:
        handle.write("\n".join(outcomes))
    dist.destroy_process_group()


def run_ranks(tmp_path, failing_rank=None):
    log, results = tmp_path / "log", tmp_path / "results"
    torch.multiprocessing.spawn(_in_process_group, args=(free_port(), str(log), failing_rank, str(results)),
                                nprocs=len(LOCAL_RANKS))
    outcomes = [(tmp_path / f"results.{rank}").read_text().splitlines() for rank in range(len(LOCAL_RANKS))]
    return log.read_text().splitlines(), outcomes


@pytest.mark.slow
def test_the_data_is_fetched_by_rank_zero_then_each_node_then_the_rest_and_checked_once(tmp_path):
    log, outcomes = run_ranks(tmp_path)
    assert log[:4] == ["start 0", "end 0", "start 2", "end 2"]  # rank 0 alone, then node 1's first process
    assert log[4:6] == ["start 1", "end 1"] and log[6:] == ["check 0"]
    assert outcomes == [["returned 0", "returned None"], ["returned 1", "returned None"],
                        ["returned 2", "returned None"]]


@pytest.mark.slow
def test_a_failure_of_rank_zero_is_reported_on_every_rank_and_nobody_else_fetches(tmp_path):
    log, outcomes = run_ranks(tmp_path, failing_rank=0)
    assert log == ["start 0", "check 0"]
    for rank_outcomes in outcomes:
        assert rank_outcomes == ["raised --data_path: rank 0 could not fetch the data",
                                 "raised --data_path: val/x.png is not a readable image"]


def torchrun_node(flags, node_rank, port):
    environment = {name: value for name, value in os.environ.items() if name not in distributed.TORCHRUN_VARIABLES}
    environment.update(CONVNN_SYNTHETIC_SIZES=SIZES, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "vit_main.py",
               *flags]
    return subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_nodes_of_one_process_give_the_metrics_of_two_processes_on_one_node(tmp_path):
    """Both launchers share the output directory, as nodes on a shared file system do."""
    flags = run_flags(tmp_path / "two_nodes", 100, 2)
    port = free_port()
    nodes = [torchrun_node(flags, node_rank, port) for node_rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    torchrun(run_flags(tmp_path / "one_node", 100, 2))
    assert_same_metrics(metrics(tmp_path / "two_nodes"), metrics(tmp_path / "one_node"))
    environment_text = (tmp_path / "two_nodes" / "environment.txt").read_text()
    assert "processes: 2 on 2 node(s)" in environment_text and "rank 1: host " in environment_text
    assert "processes: 2 on 1 node(s)" in (tmp_path / "one_node" / "environment.txt").read_text()


def test_a_failure_that_cannot_be_pickled_is_sent_as_its_message():
    class HoldsALock(Exception):
        def __init__(self):
            super().__init__("--data_path: cannot read")
            self.lock = threading.Lock()

    sent = distributed._picklable(HoldsALock())
    assert type(sent) is RuntimeError and str(sent) == "--data_path: cannot read"
    failure = dataset.DatasetUnavailableError("--data_path: damaged")
    assert distributed._picklable(failure) is failure and distributed._picklable(None) is None
