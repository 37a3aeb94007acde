"""Dumping on torchrun: `torchrun --nproc_per_node=K -m moqae dump …` (and the usual rendezvous flags across
nodes). Each rank dumps its share of the windows, the `--num-shards`/`--shard-index` split with RANK and
WORLD_SIZE, into `OUT.parts/part-RANK`; rank 0 then joins the parts into OUT with `merge` and removes
them. Ranks wait for each other over a gloo process group, which needs no GPU."""
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import MoqaeError
from .writer import merge

# How long a rank that has finished its part waits for the others: parts are equal up to one window, but
# a rank may have started late or resumed less.
WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class Torchrun:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @staticmethod
    def from_environment() -> "Torchrun | None":
        """This process's place when torchrun started more than one, else None."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return Torchrun(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                        int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    def part_directory(self, out: str, rank: int | None = None) -> str:
        return os.path.join(f"{out}.parts", f"part-{self.rank if rank is None else rank}")

    def device(self, device: str, device_map: str | None) -> str:
        """`auto` and `cuda` become this rank's own GPU; a device map, which spreads one model over every GPU
        of a node, needs one process per node."""
        if device_map and self.local_world > 1 and torch.cuda.is_available():
            raise MoqaeError(f"--device-map {device_map} spreads the model over every GPU of a node, but torchrun started "
                             f"{self.local_world} processes on this one: use --nproc_per_node=1")
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def start(self) -> None:
        dist.init_process_group("gloo", timeout=WAIT)

    def join(self, out: str) -> int:
        """Waits for every rank's part, then rank 0 merges them into `out`. Returns the store's sequences on
        every rank, or raises rank 0's error on every rank."""
        dist.barrier()
        outcome = [None]
        if self.rank == 0:
            try:
                parts = [self.part_directory(out, rank) for rank in range(self.world)]
                for rank, part in enumerate(parts):
                    if not os.path.isdir(part):
                        raise MoqaeError(f"{part}: rank {rank}'s part is not visible from rank 0; across nodes --out must be "
                                         "on a filesystem every node shares (or copy the parts here and run merge)")
                outcome = [merge(out, parts)]
                shutil.rmtree(f"{out}.parts")
            except Exception as error:  # noqa: BLE001 - every rank must hear of it, or they wait for WAIT
                outcome = [str(error) if isinstance(error, MoqaeError) else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(outcome, src=0)
        dist.destroy_process_group()
        if isinstance(outcome[0], str):
            raise MoqaeError(outcome[0] if self.rank == 0 else f"rank 0 could not merge the parts: {outcome[0]}")
        return outcome[0]
