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
    """Rows of `len(defaults)` float64 values per sample id; an id never written reads as `defaults`.

    A dict maps each id this rank owns to its row of `values` (rows in the order the ids arrived; the storage
    doubles when full), so a step's lookup and write cost O(batch), whatever the table's size."""

    def __init__(self, defaults: Sequence[float]) -> None:
        self.defaults = torch.tensor(list(defaults), dtype=F64)
        self._clear()

    def _clear(self) -> None:
        self._row: dict[int, int] = {}                                # id → its row
        self._keys = torch.empty(0, dtype=torch.long)
        self._values = torch.empty(0, len(self.defaults), dtype=F64)

    def __len__(self) -> int:
        return len(self._row)

    @property
    def keys(self) -> Tensor:
        """This rank's ids, in the order they were first written."""
        return self._keys[:len(self)]

    @property
    def values(self) -> Tensor:
        """Their rows (a view: row r belongs to keys[r])."""
        return self._values[:len(self)]

    @staticmethod
    def owned(ids: Tensor) -> Tensor:
        """True where this rank owns the id (id mod world size = rank)."""
        return torch.remainder(ids.cpu(), get_world_size()) == get_rank()

    def local(self, ids: Tensor) -> Tensor:
        """(len(ids), C) values of ids this rank owns (the defaults where never written)."""
        out = self.defaults.expand(len(ids), -1).clone()
        row = self._row.get
        at = torch.tensor([row(i, -1) for i in ids.tolist()], dtype=torch.long)
        found = at >= 0
        out[found] = self._values[at[found]]
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
        """Overwrite the rows of known ids and append the new ones (no collective; O(batch), the storage's
        doubling amortised); of repeated ids the last row wins."""
        last = {i: n for n, i in enumerate(ids.tolist())}             # id → its last position in the batch
        rows = [self._row.setdefault(i, len(self._row)) for i in last]
        self._reserve(len(self._row))
        at, of = torch.tensor(rows, dtype=torch.long), torch.tensor(list(last.values()), dtype=torch.long)
        self._keys[at], self._values[at] = ids[of], values[of].to(F64)

    def _reserve(self, size: int) -> None:
        """Room for `size` rows: the storage at least doubles when it grows."""
        if size > len(self._keys):
            capacity = max(size, 2 * len(self._keys), 1024)
            keys, values = torch.empty(capacity, dtype=torch.long), torch.empty(capacity, len(self.defaults), dtype=F64)
            keys[:len(self._keys)], values[:len(self._keys)] = self._keys, self._values
            self._keys, self._values = keys, values

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's ids in ascending order and their rows (the same shard whatever order the ids came in)."""
        order = torch.argsort(self.keys)
        return {"keys": self.keys[order], "values": self.values[order]}

    def load_shards(self, shards: Iterable[dict[str, Tensor]]) -> None:
        """Replace this rank's rows by the ones it owns among every saved shard (any saved world size)."""
        self._clear()
        for shard in shards:
            keys, values = shard["keys"].long(), shard["values"].to(F64)
            if values.ndim != 2 or values.shape != (len(keys), len(self.defaults)):
                raise ValueError(f"sample state shard: expected values ({len(keys)}, {len(self.defaults)}) for "
                                 f"{len(keys)} ids, got {tuple(values.shape)}")
            mine = self.owned(keys)
            self._put(keys[mine], values[mine])
