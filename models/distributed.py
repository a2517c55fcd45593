"""torch.distributed for the command lines: which rank this process is, and the few collectives.

`torchrun` starts one process per rank with RANK, WORLD_SIZE and LOCAL_RANK set;
`start_distributed` joins them (gloo on the CPU, NCCL on GPUs). Without torchrun everything
here works for a single process, so callers need no second code path.
"""

from __future__ import annotations

import os

import torch

__all__ = ["Ranks", "RankFailure", "start_distributed", "stop_distributed"]


class RankFailure(RuntimeError):
    """A rank failed; the message names the rank(s) and their errors (raised on every rank)."""


class Ranks:
    """This process's place among the ranks of a job, and the collectives the tools need.

    Alone (world 1) every collective just returns this process's own value.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def all_gather(self, value: object) -> list[object]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        found: list[object] = [None] * self.world
        dist.all_gather_object(found, value)
        return found

    def gather(self, value: object) -> list[object] | None:
        """Every rank's value on rank 0 (None on the others)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        found: list[object] | None = [None] * self.world if self.main else None
        dist.gather_object(value, found, dst=0)
        return found

    def broadcast(self, value: object) -> object:
        """Rank 0's value on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: str | None) -> None:
        """Raise `RankFailure` on every rank if any rank reports an error (a collective)."""
        errors = [e for e in self.all_gather(error) if e]
        if errors:
            raise RankFailure("; ".join(str(e) for e in errors))


def say(ranks: Ranks, text: str) -> None:
    """Print on the main rank only."""
    if ranks.main:
        print(text, flush=True)


def start_distributed(device: str = "cpu") -> Ranks:
    """Join the torchrun job this process belongs to, if any (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def stop_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
