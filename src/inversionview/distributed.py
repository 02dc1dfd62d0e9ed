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
        raise UserError(
            f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them), got "
            f"{os.environ['WORLD_SIZE']!r}, {os.environ['RANK']!r}, "
            f"{os.environ.get('LOCAL_RANK')!r}"
        ) from None


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
        raise UserError(
            f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA GPU: use 'cpu' or 'auto'"
        )
    if name == "cuda":
        index = local_rank
    elif world > 1:
        raise UserError(
            f"device {name!r} names one GPU, but torchrun started {world} processes: use 'cuda' "
            "or 'auto' (process k uses cuda:k on its node)"
        )
    else:
        index = int(name.split(":")[1])
    if index >= torch.cuda.device_count():
        raise UserError(f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU features (``/proc/cpuinfo`` flags) under which bf16 matrix products run fast: AVX512-BF16 and AMX on x86,
the BF16 extension on Arm. Without them torch emulates bf16 and a matmul runs ~200x slower than in float32."""


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The bf16 features this CPU reports (none where ``/proc/cpuinfo`` cannot be read, e.g. off Linux)."""
    try:
        text = open(cpuinfo).read()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[-1].split())
            return [f for f in BF16_CPU_FLAGS if f in have]
    return []


def choose_bf16(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """Whether the decoder trains under bf16 autocast, and why. ``"auto"``: where the device runs bf16 fast (a
    CUDA GPU with native bf16; a CPU with AVX512-BF16, AMX or Arm BF16), else float32. ``True`` forces bf16 where
    the device has it at all (a warning where it is slow); ``False`` is float32."""
    if setting is False:
        return False, "bf16 = false in [train]"
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 has no emulation argument
            native = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        if native:
            return True, f"{name} runs bf16 natively"
        if setting is True:
            log.warning("%s has no native bf16: training the decoder in float32 despite bf16 = true", name)
        return False, f"{name} has no native bf16"
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_bf16_flags()
    if flags:
        return True, f"the CPU has {', '.join(flags)} (torch CPU capability {cap})"
    why = f"the CPU has no bf16 instructions (torch CPU capability {cap}; no {', '.join(BF16_CPU_FLAGS)} flag)"
    if setting is True:
        log.warning(
            "bf16 = true in [train], but %s: bf16 runs several times slower than float32 here; "
            'set bf16 = "auto" or false',
            why,
        )
        return True, "bf16 = true in [train] (" + why + ")"
    return False, why
