"""The process's runtime: seeding, the state of the random generators, and the devices.
(Output files are in ``run_files``, checkpoints in ``checkpoints``.)"""

import math
import random
from typing import Dict, List, Optional

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------


# numpy takes seeds in [0, 2**32 - 1].
SEED_MAX = 2**32 - 1


def seed_everything(seed: int) -> None:
    """Seeds every generator the run draws from (python, numpy, torch on all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA / MPS device


def capture_rng_state() -> Dict:
    """The state of every global generator, stored as tensors and plain values only so that
    checkpoints load with ``torch.load(weights_only=True)``."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    # A checkpoint written on another machine may hold a different number of GPUs (or none).
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(saved) -> tuple:
    # random.setstate wants tuples all the way down; a round trip through storage may give lists.
    version, internal, gauss = saved
    return version, tuple(internal), gauss


# ---------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------


def round_half_up(value: float) -> int:
    """The whole number nearest ``value``, halves rounded up (2.5 -> 3), not to even as Python's round does:
    a share of epochs or of images that is exactly half way gets the larger count."""
    return math.floor(value + 0.5)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def available_devices() -> List[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def device_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be used here, or None when it can."""
    available = available_devices()
    if name in available:
        return None
    return f"{name} is not available on this machine; available: {', '.join(available)}"


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

