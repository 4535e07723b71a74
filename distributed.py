"""Data parallelism under ``torchrun``: the process group, the samplers, and exact metric sums.

A run started by ``torchrun --nproc_per_node N vit_main.py ...`` finds RANK, WORLD_SIZE and
LOCAL_RANK in its environment and trains one model replica per process with
DistributedDataParallel. Without that environment nothing here changes a run: every helper falls
back to a single process (rank 0 of 1).
"""

import atexit
import datetime
import os
import pickle
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Sampler

import utils

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")
# A rank waits this long for the others (e.g. while rank 0 writes a checkpoint) before giving up.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def torchrun_environment() -> Optional[Dict[str, int]]:
    """RANK, WORLD_SIZE and LOCAL_RANK as set by torchrun, or None for a plain single-process start."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return {name.lower(): int(os.environ[name]) for name in TORCHRUN_VARIABLES}


def setup(device_type: str) -> torch.device:
    """Joins the process group when started by torchrun and returns this process's device:
    ``gloo`` on the CPU, ``nccl`` on CUDA with one GPU per process (cuda:LOCAL_RANK)."""
    environment = torchrun_environment()
    if environment is None:
        return torch.device(device_type)
    if device_type == "mps":
        raise ValueError("--device: torchrun data parallelism runs on cpu or cuda, not mps")
    device = torch.device(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", environment["local_rank"])
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                            rank=environment["rank"], world_size=environment["world_size"],
                            timeout=PROCESS_GROUP_TIMEOUT)
    atexit.register(shutdown)  # also when the program ends with an error
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 alone prints progress and writes files."""
    return rank() == 0


def print_main(*values, **options) -> None:
    """``print`` on rank 0 only: it reports for all ranks. Warnings and errors are printed to stderr
    with ``print`` itself, so that every rank's reach the terminal."""
    if is_main_process():
        print(*values, **options)


def decorrelate_ranks(seed: int, start_epoch: int) -> None:
    """Every rank builds the model from the same seed (identical replicas); afterwards ranks other
    than 0 reseed their generators, so that their dropout masks and random neighbour sampling differ
    from rank 0's instead of repeating them. Rank 0 keeps its stream, which the checkpoints save."""
    if rank() > 0:
        # Wrapped into numpy's seed range, which --seed itself fills.
        utils.seed_everything((seed + 1_000_003 * rank() + start_epoch) % (utils.SEED_MAX + 1))


def wait_for_all_processes() -> None:
    """Returns once every rank has reached this call (at once outside a process group)."""
    if is_distributed():
        dist.barrier()


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as a DistributedDataParallel replica when in a process group, else unchanged.
    DDP averages the gradients over the ranks after each backward pass."""
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (``values`` itself outside a process group)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(value: Any) -> List[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` outside a process group."""
    if not is_distributed():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def rank_zero_first(action: Callable[[], T]) -> T:
    """``action()`` on every rank, in turns: rank 0 first, then (once it succeeded) each other node's first
    process (LOCAL_RANK 0), then the rest. A download into a directory all nodes share is then made once,
    and into each node's own directory once per node, never by two processes at once. A failure in a turn
    is raised on every rank (the others raise the failing rank's exception), so that no rank waits for ever."""
    if not is_distributed():
        return action()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    turns = (rank() == 0, rank() > 0 and local_rank == 0, local_rank > 0)
    result = None
    for my_turn in turns:
        failure = None
        if my_turn:
            try:
                result = action()
            except Exception as error:  # any failure: the others must hear of it rather than wait
                failure = error
        _raise_any(failure)
    return result


def on_rank_zero(action: Callable[[], None]) -> None:
    """``action()`` on rank 0 alone (a check of shared files, made once per run) while the others wait; its
    failure is raised on every rank."""
    failure = None
    if is_main_process():
        try:
            action()
        except Exception as error:  # any failure: the others must hear of it rather than wait
            failure = error
    if is_distributed():
        _raise_any(failure)
    elif failure is not None:
        raise failure


def _raise_any(failure: Optional[Exception]) -> None:
    """Raises ``failure`` here, or on every rank the first rank's failure when any rank had one (a collective)."""
    failures = [error for error in gather_objects(_picklable(failure)) if error is not None]
    if failure is not None:
        raise failure
    if failures:
        raise failures[0]


def _picklable(failure: Optional[Exception]) -> Optional[Exception]:
    """``failure``, or a RuntimeError with its message when it cannot be pickled: a rank that failed to send
    its failure would leave the others waiting."""
    try:
        pickle.dumps(failure)
    except Exception:  # unpicklable attributes raise all kinds of errors
        return RuntimeError(str(failure))
    return failure


def barrier() -> None:
    """Waits for every rank (e.g. for rank 0 to finish writing a checkpoint); nothing outside a process group."""
    if is_distributed():
        dist.barrier()


class ContiguousShards(Sampler):
    """Splits ``range(len(dataset))`` into one contiguous, unpadded block per rank (sizes differ by at
    most one), so that an evaluation over all ranks sees every sample exactly once. The
    DistributedSampler pads the last shard with repeated samples instead, which is fine for
    training but would count those samples twice in a metric."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.start = rank * len(dataset) // num_replicas
        self.end = (rank + 1) * len(dataset) // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
