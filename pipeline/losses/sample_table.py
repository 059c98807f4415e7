"""Per-sample state of a loss (iSogCLR's temperatures), keyed by a stable 64-bit sample id, sharded across ranks.

Rank r owns the ids with id mod W = r (W the world size; ids are blake2b hashes of the sample's source,
shard and key, `pipeline.data.samples.sample_id`, so the split is even and the same in every process,
unlike Python's salted hash()). A step gathers the batch's ids (every rank sees all N), each owner supplies
the values of the ids it owns (unseen ids: the defaults) and one all-reduced sum gives every rank all N
rows; after the step every rank gathers the new rows and each owner keeps its own. The values are float64
on the CPU: the lookup's sum adds exact zeros, so every world size reads the same numbers.

`state_dict()` is this rank's shard; `load_shards(shards)` takes every saved rank's shard and keeps what this
rank owns at the current world size, so a checkpoint written by W ranks resumes on any other number.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from pipeline.distributed import all_gather, all_reduce_sum, get_rank, get_world_size

F64 = torch.float64


class SampleTable:
    """Rows of `len(defaults)` float64 values per sample id; an id never written reads as `defaults`."""

    def __init__(self, defaults: Sequence[float]) -> None:
        self.defaults = torch.tensor(list(defaults), dtype=F64)
        self.keys = torch.empty(0, dtype=torch.long)                  # sorted, this rank's ids
        self.values = torch.empty(0, len(self.defaults), dtype=F64)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def owned(ids: Tensor) -> Tensor:
        """True where this rank owns the id (id mod world size = rank)."""
        return torch.remainder(ids.cpu(), get_world_size()) == get_rank()

    def local(self, ids: Tensor) -> Tensor:
        """(len(ids), C) values of ids this rank owns (the defaults where never written)."""
        out = self.defaults.expand(len(ids), -1).clone()
        if len(self.keys):
            at = torch.searchsorted(self.keys, ids).clamp(max=len(self.keys) - 1)
            found = self.keys[at] == ids
            out[found] = self.values[at[found]]
        return out

    def lookup(self, all_ids: Tensor) -> Tensor:
        """(N, C) float64 values of the global batch's ids (the same `all_ids` on every rank): a collective."""
        ids = all_ids.detach().cpu().long()
        mine = self.owned(ids)
        out = torch.zeros(len(ids), len(self.defaults), dtype=F64)
        out[mine] = self.local(ids[mine])
        return all_reduce_sum(out.to(all_ids.device)).cpu()

    def write(self, ids: Tensor, values: Tensor) -> None:
        """Every rank's rows (ids (n,), values (n, C)) are gathered; each owner keeps the ones it owns. An id
        given twice keeps its later row (rank-major order). A collective: every rank calls it."""
        all_ids = all_gather(ids.detach().long()).cpu()
        all_values = all_gather(values.detach().to(F64)).cpu()
        mine = self.owned(all_ids)
        self._put(all_ids[mine], all_values[mine])

    def _put(self, ids: Tensor, values: Tensor) -> None:
        """Overwrite the rows of known ids in place and merge the new ones in (no collective; O(table + batch),
        no sort of the table); of repeated ids the last row wins."""
        order = torch.sort(ids, stable=True).indices
        ids, values = ids[order], values[order]
        last = torch.ones(len(ids), dtype=torch.bool)
        last[:-1] = ids[1:] != ids[:-1]
        ids, values = ids[last], values[last]
        at = torch.searchsorted(self.keys, ids)
        found = torch.zeros(len(ids), dtype=torch.bool)
        if len(self.keys):
            found = self.keys[at.clamp(max=len(self.keys) - 1)] == ids
            self.values[at[found]] = values[found]
        fresh, rows = ids[~found], values[~found]                # sorted, none in the table
        if len(fresh):
            size = len(self.keys) + len(fresh)
            old_to = torch.arange(len(self.keys)) + torch.searchsorted(fresh, self.keys)
            new_to = torch.searchsorted(self.keys, fresh) + torch.arange(len(fresh))
            keys, table = torch.empty(size, dtype=torch.long), torch.empty(size, self.values.shape[1], dtype=F64)
            keys[old_to], keys[new_to] = self.keys, fresh
            table[old_to], table[new_to] = self.values, rows
            self.keys, self.values = keys, table

    def state_dict(self) -> dict[str, Tensor]:
        return {"keys": self.keys.clone(), "values": self.values.clone()}

    def load_shards(self, shards: Iterable[dict[str, Tensor]]) -> None:
        """Replace this rank's rows by the ones it owns among every saved shard (any saved world size)."""
        self.keys = torch.empty(0, dtype=torch.long)
        self.values = torch.empty(0, len(self.defaults), dtype=F64)
        for shard in shards:
            keys, values = shard["keys"].long(), shard["values"].to(F64)
            if values.ndim != 2 or values.shape != (len(keys), len(self.defaults)):
                raise ValueError(f"sample state shard: expected values ({len(keys)}, {len(self.defaults)}) for "
                                 f"{len(keys)} ids, got {tuple(values.shape)}")
            mine = self.owned(keys)
            self._put(keys[mine], values[mine])
