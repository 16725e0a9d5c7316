"""Groups spread over processes with torch.distributed (gloo on CPU, nccl on GPUs).

Launch with ``torchrun --nproc-per-node N -m fips_rt.cli compress ...`` (or ``--distributed`` with
the usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables). Local error minimization is
independent per group, so group g goes to rank g mod N; the global allocation's histograms are summed
over ranks (integers: every rank gets the threshold one process would get), the finished groups'
factors are sent to rank 0, which writes the one checkpoint. The process group has a timeout, and every
failure of a collective (a peer killed, a peer past the timeout) becomes one FipsError line.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import FipsError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    backend: str | None = None  # None: one process, no process group

    @property
    def active(self) -> bool:
        return self.backend is not None

    def owns(self, group_index: int) -> bool:
        return group_index % self.world == self.rank

    def owner(self, group_index: int) -> int:
        return group_index % self.world


def env_requests_distributed() -> bool:
    """torchrun (or the user) set WORLD_SIZE: the run is meant to be distributed."""
    return "WORLD_SIZE" in os.environ


def init(timeout_s: float, device: torch.device) -> Ranks:
    """Join the process group described by the environment (torchrun's variables)."""
    import torch.distributed as dist
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise FipsError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); "
                        f"launch with: torchrun --nproc-per-node N -m fips_rt.cli compress ...")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise FipsError("RANK and WORLD_SIZE must be integers.") from None
    if not (0 <= rank < world):
        raise FipsError(f"RANK {rank} is outside WORLD_SIZE {world}.")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count()))
    with failures(rank, "joining the process group"):
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
    return Ranks(rank, world, backend)


@contextmanager
def failures(rank: int, what: str):
    """Any error of torch.distributed inside becomes one FipsError line (no traceback, no hang)."""
    try:
        yield
    except FipsError:
        raise
    except (RuntimeError, ValueError, OSError) as e:  # DistBackendError / DistError subclass RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FipsError(f"distributed run failed on rank {rank} while {what}: a peer process stopped or "
                        f"timed out ({first})") from None


def _dev(r: Ranks) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if r.backend == "nccl" else torch.device("cpu")


def all_sum(r: Ranks, t: torch.Tensor, what: str = "summing statistics") -> torch.Tensor:
    if not r.active:
        return t
    import torch.distributed as dist
    with failures(r.rank, what):
        x = t.to(_dev(r))
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)


def all_max(r: Ranks, value: float, what: str = "gathering peaks") -> float:
    if not r.active:
        return value
    import torch.distributed as dist
    with failures(r.rank, what):
        x = torch.tensor([float(value)], dtype=torch.float64, device=_dev(r))
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return float(x.item())


def barrier(r: Ranks, what: str) -> None:
    if r.active:
        import torch.distributed as dist
        with failures(r.rank, what):
            dist.barrier()


def send_tensors(r: Ranks, tensors: list[torch.Tensor], dst: int = 0) -> None:
    """Send a list of tensors to ``dst`` (a small header first: count, then per tensor dtype code,
    ndim, shape), in order; ``recv_tensors`` on ``dst`` gets them back."""
    import torch.distributed as dist
    head = [len(tensors)]
    for t in tensors:
        head += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    with failures(r.rank, f"sending factors to rank {dst}"):
        h = torch.tensor(head, dtype=torch.int64)
        dist.send(torch.tensor([h.numel()], dtype=torch.int64).to(_dev(r)), dst)
        dist.send(h.to(_dev(r)), dst)
        for t in tensors:
            dist.send(t.contiguous().to(_dev(r)), dst)


def recv_tensors(r: Ranks, src: int) -> list[torch.Tensor]:
    import torch.distributed as dist
    with failures(r.rank, f"receiving factors from rank {src}"):
        n = torch.zeros(1, dtype=torch.int64, device=_dev(r))
        dist.recv(n, src)
        h = torch.zeros(int(n.item()), dtype=torch.int64, device=_dev(r))
        dist.recv(h, src)
        head = h.cpu().tolist()
        out, i = [], 1
        for _ in range(head[0]):
            dt, nd = _DTYPES[head[i]], head[i + 1]
            shape = head[i + 2:i + 2 + nd]
            i += 2 + nd
            t = torch.empty(shape, dtype=dt, device=_dev(r))
            dist.recv(t, src)
            out.append(t.cpu())
        return out


_DTYPES = [torch.float32, torch.float64, torch.uint8, torch.bool, torch.int64, torch.int32, torch.float16,
           torch.bfloat16]


def close(r: Ranks) -> None:
    if r.active:
        import torch.distributed as dist
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
