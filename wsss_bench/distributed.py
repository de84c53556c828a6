"""Multi-process runs under ``torchrun``: process group, rank-0-only side effects, barriers.

Every process runs the same method code.  Training wraps the classifier in
DistributedDataParallel (each process takes its share of every global batch), CAM inference
writes disjoint shards of each split, and everything else that touches the run folder (the
manifest, checkpoints, clustering, evaluation, tables) happens on rank 0 while the others wait
at a barrier and then read what rank 0 wrote.  The run folder must therefore be on a file
system all processes see (any local disk for one machine; a shared one across nodes).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper here is a no-op.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import ConfigError, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (``world_size == 1`` for an ordinary run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether several processes take part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 owns every write to the run folder that is not a CAM shard."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every process (any picklable object, sent by torch.distributed
        between our own processes only)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (also a synchronisation point)."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every process.

        A user error raised there (bad path, malformed file) is raised on every process, so
        all of them exit with the same one-line message instead of waiting forever.
        """
        if not self.enabled:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except UserError as exc:
                outcome = ("error", exc)
        kind, payload = self.broadcast(outcome)
        if kind == "error":
            raise payload
        return payload

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. generating or caching data), the others after it."""
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()


_current = Distributed()


def current() -> Distributed:
    """The job description set up by :func:`setup` (single process before that)."""
    return _current


def setup(device_spec: str = "auto") -> tuple[Distributed, torch.device]:
    """Join the ``torchrun`` job described by the environment, if any, and pick the device.

    Backend: NCCL when the processes use CUDA (one GPU per process, ``cuda:LOCAL_RANK``),
    gloo on CPU.  Idempotent: later calls return the same job.
    """
    global _current
    device = resolve_device(device_spec)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _current, device
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE is set but RANK is not: start multi-process runs with torchrun") from None
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_teardown)
    _current = Distributed(rank, world, local)
    if rank != 0:  # one voice: the other ranks only report problems
        logging.getLogger("wsss_bench").setLevel(logging.WARNING)
    return _current, device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
