"""What a training run ran on (``environment.txt``): the versions of Python, torch, torchvision, CUDA and
cuDNN, the devices, processes, nodes and hosts, the project's git commit, and when it started. Each start
of the run (the first, and every --resume) appends its own section, so that the file tells every
epoch's environment."""

import datetime
import os
import platform
import socket
import subprocess
from typing import Dict, List, Optional

import torch
import torchvision

import distributed
from run_files import atomic_write_text

ENVIRONMENT_FILE = "environment.txt"
# The project's root: the git checkout whose commit a run records.
PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
GIT_TIMEOUT_SECONDS = 10


def this_process(device: torch.device) -> Dict[str, str]:
    """This rank's host, node (torchrun's GROUP_RANK, 0 outside torchrun) and device name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or device.type
    return {"host": socket.gethostname(), "node": os.environ.get("GROUP_RANK", "0"),
            "device": f"{device} ({name})"}


def git_commit(root: str = PROJECT_ROOT) -> str:
    """``git rev-parse HEAD`` of the checkout at ``root``, with " dirty" when its tree has changes, or a
    note saying why there is none (not a git checkout, no git installed)."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    except FileNotFoundError:
        return "unknown (git is not installed)"
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        return "unknown (not a git checkout)"
    return f"{commit} dirty" if changes else commit


def _git(root: str, *arguments: str) -> str:
    return subprocess.run(["git", "-C", root, *arguments], capture_output=True, text=True, check=True,
                          timeout=GIT_TIMEOUT_SECONDS).stdout.strip()


def section(processes: List[Dict[str, str]], started: datetime.datetime, start_number: int,
            commit: Optional[str] = None) -> str:
    """The text of one start's section: ``processes`` holds every rank's ``this_process``, in rank order."""
    cuda = torch.version.cuda or "none (torch built without CUDA)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    nodes = len({process["node"] for process in processes})
    lines = [
        f"== start {start_number}: {started.isoformat(timespec='seconds')} ==",
        f"python: {platform.python_version()} ({platform.python_implementation()})",
        f"torch: {torch.__version__}",
        f"torchvision: {torchvision.__version__}",
        f"cuda: {cuda}",
        f"cudnn: {cudnn if cudnn is not None else 'none'}",
        f"processes: {len(processes)} on {nodes} node(s)",
        f"hosts: {', '.join(sorted({process['host'] for process in processes}))}",
        *(f"rank {rank}: host {process['host']}, node {process['node']}, {process['device']}"
          for rank, process in enumerate(processes)),
        f"git commit: {commit if commit is not None else git_commit()}",
    ]
    return "\n".join(lines) + "\n"


def starts_in(text: str) -> int:
    """How many starts an environment.txt records."""
    return sum(line.startswith("== start ") for line in text.splitlines())


def record_start(path: str, device: torch.device, started: datetime.datetime) -> None:
    """Appends this start's section to ``path`` (a collective under torchrun: every rank calls it, rank 0
    writes). The file is replaced atomically with its earlier sections and the new one."""
    processes = distributed.gather_objects(this_process(device))
    if not distributed.is_main_process():
        return
    try:
        with open(path, encoding="utf-8") as handle:
            earlier = handle.read()
    except FileNotFoundError:
        earlier = ""
    separator = "\n" if earlier and not earlier.endswith("\n\n") else ""
    atomic_write_text(path, earlier + separator + section(processes, started, starts_in(earlier) + 1))
