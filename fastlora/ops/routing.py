"""Mixed batches' routing: which adapter each row gets, and the rows grouped by adapter.

An :class:`AdapterRouting` holds one batch's adapter ids (on the host) and is built once per batch —
:func:`fastlora.use_adapters` builds it, every layer's call receives it (as vLLM's ``LoRAKernelMeta``). Its
:class:`Rows` for an input shape and device (ids per row, the sort order, the segments, the counts) are computed on
the host from those ids — no device-to-host read — and copied to the device once, then shared by every layer whose
input has that shape. The ids are the object's own and never change, so nothing derived from them can go stale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class Rows:
    """The routing of a flattened ``(M, in)`` input: ``ids`` (int64, one per row, -1: no adapter) and ``order``
    (int64, the rows sorted by adapter, stably, the -1 rows first) on the input's device; adapter ``a``'s rows are
    ``order[starts[a]:starts[a + 1]]`` and ``counts[a]`` in number (host lists); ``named[a]``: some row names it.
    The triton kernels read int32 copies: ``sorted_ids32``, ``order32`` and ``starts32``."""

    __slots__ = ("counts", "ids", "named", "order", "order32", "sorted_ids32", "starts", "starts32")

    def __init__(self, flat_ids: Tensor, adapters: int, device: torch.device) -> None:
        order = torch.argsort(flat_ids, stable=True)
        per_id = torch.bincount(flat_ids + 1, minlength=adapters + 1).tolist()  # [-1's count, 0's, 1's, ...]
        self.counts = per_id[1:]
        self.named = [c > 0 for c in self.counts]
        self.starts = [sum(per_id[:a + 1]) for a in range(adapters + 1)]
        wide = torch.cat([flat_ids, order])
        narrow = torch.cat([flat_ids[order], order, torch.tensor(self.starts)]).to(torch.int32)
        if device.type == "cuda":  # pinned: the copies need not wait for the device
            wide, narrow = (t.pin_memory().to(device, non_blocking=True) for t in (wide, narrow))
        elif device.type != "cpu":
            wide, narrow = wide.to(device), narrow.to(device)
        M = flat_ids.shape[0]
        self.ids, self.order = wide[:M], wide[M:]
        self.sorted_ids32, self.order32, self.starts32 = narrow[:M], narrow[M:2 * M], narrow[2 * M:]

    def rows_of(self, adapter: int) -> Tensor | None:
        """The (ascending) indices of the rows that name ``adapter``, or None when none does."""
        return self.order[self.starts[adapter]:self.starts[adapter + 1]] if self.counts[adapter] else None


class AdapterRouting:
    """One mixed batch: an adapter id (-1: none) for each row of the input's leading dims, or of a prefix of them
    (e.g. one per sequence of ``(batch, seq, in)``), among ``adapters`` adapters. Checked when built; its
    :meth:`rows` are computed once per input shape and device."""

    def __init__(self, ids: Tensor | Sequence[int], adapters: int) -> None:
        if not isinstance(ids, Tensor):
            ids = torch.tensor(list(ids), dtype=torch.int64)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"adapter_ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() < 1:
            raise ValueError(f"adapter_ids must have at least one dim (one id per row or per sequence), got shape "
                             f"{tuple(ids.shape)}")
        self.ids = ids.detach().to("cpu", torch.int64)  # ids on a GPU are read back here, once per batch
        self.adapters = adapters
        if self.ids.numel() and not -1 <= int(self.ids.min()) <= int(self.ids.max()) < adapters:
            raise ValueError(f"adapter_ids must be in [-1, {adapters}) for {adapters} adapters (-1: no adapter), got "
                             f"values from {int(self.ids.min())} to {int(self.ids.max())}")
        self._rows: dict[tuple, Rows] = {}

    def rows(self, lead: Sequence[int], device: torch.device) -> Rows:
        """The routing of an input whose leading dims are ``lead``, on ``device``."""
        key = (tuple(lead), device)
        found = self._rows.get(key)
        if found is None:
            k = self.ids.dim()
            if k > len(lead) or tuple(self.ids.shape) != tuple(lead[:k]):
                raise ValueError(f"adapter_ids must have the shape of x's leading dims or a prefix of them (one id "
                                 f"per row or per sequence): x's leading dims {tuple(lead)}, adapter_ids "
                                 f"{tuple(self.ids.shape)}")
            flat = self.ids.reshape(*self.ids.shape, *[1] * (len(lead) - k)).expand(*lead).reshape(-1)
            found = self._rows[key] = Rows(flat, self.adapters, device)
        return found
