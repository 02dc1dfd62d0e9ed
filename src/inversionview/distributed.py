"""Where training runs: the device, and the process group when ``torchrun`` launched this process.

``torchrun --nproc-per-node N -m inversionview train CONFIG`` starts N processes and sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK`` in each. :func:`session` joins them into one ``torch.distributed`` process group (NCCL on CUDA,
gloo on CPU) and leaves it at the end; in a process that torchrun did not start it does nothing, and
``world == 1``.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows the progress bar."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over all processes (in place; ``x`` itself with one process)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every process (in place)."""
        if self.world > 1:
            dist.broadcast(x, 0)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def from_env() -> Dist:
    """The torchrun environment of this process; rank 0 of 1 without it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return Dist()
    try:
        return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them), got "
                        f"{os.environ['WORLD_SIZE']!r}, {os.environ['RANK']!r}, "
                        f"{os.environ.get('LOCAL_RANK')!r}") from None


@contextmanager
def session(device: torch.device):
    """Join the torchrun process group for the duration (a no-op with one process). Yields a :class:`Dist`."""
    d = from_env()
    if d.world == 1:
        yield d
        return
    own = not dist.is_initialized()
    if own:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        if d.main:
            log.info("training on %d processes (%s)", d.world, backend)
    try:
        yield d
    finally:
        if own:
            dist.destroy_process_group()


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Under torchrun with several
    processes, ``"auto"`` and ``"cuda"`` give each process the GPU ``cuda:LOCAL_RANK``."""
    name = str(name).strip()
    if not DEVICE.fullmatch(name):
        raise UserError(f"unknown device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA GPU: "
                        "use 'cpu' or 'auto'")
    if name == "cuda":
        index = local_rank
    elif world > 1:
        raise UserError(f"device {name!r} names one GPU, but torchrun started {world} processes: use 'cuda' "
                        "or 'auto' (process k uses cuda:k on its node)")
    else:
        index = int(name.split(":")[1])
    if index >= torch.cuda.device_count():
        raise UserError(f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)
