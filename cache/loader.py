"""The training loader: deterministic block shuffle + shuffle buffer, rank split, exact resume.

How an epoch is planned (all of it on indices, in the main process, ~10 ms for ImageNet):

1. The valid samples (failed ones removed) are cut into blocks of `block_size`
   consecutive samples; a permutation seeded by (seed, epoch) orders the blocks.
2. Blocks are dealt to ranks round-robin; every rank keeps the same number of batches
   (the smallest share, rounded down to whole batches), so no rank waits in a collective
   and no sample is seen twice in an epoch.
3. A rank's sample sequence is cut into windows of `shuffle_buffer` samples (a whole number
   of batches); each window is permuted (seed, epoch, rank, window) and split into batches.
   The window is the in-memory shuffle buffer: it mixes shuffle_buffer / block_size blocks
   from all over the dataset (ImageNet is stored class by class).

Streams (Mosaic's "canonical nodes"): the plan is made for `streams` virtual ranks, and a
real rank of `world_size` takes streams / world_size consecutive ones. Its batch is the
concatenation of its streams' batches, so the global batch of step s (all streams' batch
s, in stream order) is the same on 1, 2, 4 ... ranks, and a run on one process can
reproduce a multi-process run sample for sample. By default streams = world_size.

DataLoader workers only *fetch* windows: window w goes to worker w % num_workers and comes
back in order, so the batches are a function of (seed, epoch, streams, rank, world size)
alone, whatever the number of workers. A worker reads each block of its window as one run of
rows and copies each row once, straight into a shared window buffer the main process maps
(cache/shm.py; page-locked for the GPU where CUDA is present), so nothing is copied on the
way back. In process, windows are reused arrays of a pool. Resume state is (epoch, batches
consumed): the plan is recomputed and the first window re-read.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .format import (ATTN, ATTN_SCALE, CLS, INDEX, LABEL, MOMENTS, SCALES, TOKENS, TOKENS_SCALE,
                     CacheError)
from .quant import dequantize_tokens
from .reader import CacheDataset, open_cache
from .shm import SlotWriter, WindowSlots, aligned, slot_view

# fields with a leading view axis
_VIEW_FIELDS = (MOMENTS, TOKENS, TOKENS_SCALE, CLS, ATTN, ATTN_SCALE)
_FIELDS = (MOMENTS, TOKENS, CLS, ATTN, LABEL, INDEX)  # what a loader may be asked for
_SLOT = "__slot__"  # a worker's answer: where in its shared window buffer each field lies


@dataclasses.dataclass(kw_only=True)
class LoaderConfig:
    """Per-rank batch loading. Sizes are in samples."""

    batch_size: int = 256  # per rank
    fields: tuple[str, ...] = (MOMENTS, TOKENS, LABEL)  # SiT without REPA: (MOMENTS, LABEL)
    shuffle: bool = True
    seed: int = 0
    block_size: int = 8  # contiguous samples read together; 8 x 394 KB reads at 256 px
    shuffle_buffer: int = 1024  # samples per window; a multiple of batch_size
    view: str = "random"  # with 2 stored views: "random" per sample, "first", or "all"
    dequantize: bool = True  # int8 tokens, attn_qk -> fp16 in the worker (else + their scale)
    num_workers: int = 0
    prefetch_factor: int = 2  # windows in flight per worker
    pin_memory: bool | None = None  # None: when CUDA is available
    mp_context: str = "forkserver"  # zarr runs an event-loop thread: do not fork it
    backend: str | None = None  # zarr or wds when the cache has both
    # check every chunk (zarr) or member (wds) read against the CRC32C its done marker
    # records: damage stops the loader with DamagedCacheError before it reaches a batch.
    # Costs one CRC32C pass the first time a process reads a chunk, nothing after
    # (docs/performance.md); False reads unchecked
    verify: bool = True
    # threads sharing a window's copies (numpy releases the GIL in them); None: up to 4
    # (the cores this process may use) in process, 1 in each DataLoader worker
    copy_threads: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"LoaderConfig.{field}={getattr(self, field)!r}: {why}")

        self.fields = tuple(self.fields)
        if not self.fields:
            bad("fields", "name at least one field")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if self.block_size < 1:
            bad("block_size", "must be >= 1")
        if self.shuffle_buffer < self.batch_size or self.shuffle_buffer % self.batch_size:
            bad("shuffle_buffer", f"must be a positive multiple of batch_size={self.batch_size}")
        if self.view not in ("random", "first", "all"):
            bad("view", "choose 'random', 'first' or 'all'")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")
        if self.copy_threads is not None and self.copy_threads < 1:
            bad("copy_threads", "must be >= 1 (or None)")
        unknown = [f for f in self.fields if f not in _FIELDS]
        if unknown:
            bad("fields", f"unknown {unknown}; choose from {list(_FIELDS)}")


def batches_per_rank(num_valid: int, *, block_size: int, world_size: int,
                     batch_size: int) -> int:
    """Batches every rank gets per epoch. Each rank receives at least
    floor(n_blocks / world_size) blocks, at most one of them the short last block, so this
    many samples exist on every rank whatever the permutation: the count never changes
    between epochs."""
    n_blocks = -(-num_valid // block_size)
    short = n_blocks * block_size - num_valid  # samples missing from the last block
    guaranteed = max(n_blocks // world_size * block_size - short, 0)
    return guaranteed // batch_size


def epoch_plan(valid_indices: np.ndarray, *, batch_size: int, block_size: int, window: int,
               seed: int, epoch: int, rank: int = 0, world_size: int = 1,
               shuffle: bool = True) -> list[np.ndarray]:
    """The windows of one epoch for one rank: arrays of global indices in batch order,
    each a whole number of batches. Pure function of its arguments."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    n = len(valid_indices)
    n_blocks = -(-n // block_size)
    order = (np.random.default_rng([seed, epoch]).permutation(n_blocks) if shuffle
             else np.arange(n_blocks))
    n_take = batch_size * batches_per_rank(n, block_size=block_size, world_size=world_size,
                                           batch_size=batch_size)
    mine = order[rank::world_size]
    pos = (mine[:, None] * block_size + np.arange(block_size)[None, :]).ravel()
    seq = valid_indices[pos[pos < n]][:n_take]
    windows = []
    for w, start in enumerate(range(0, n_take, window)):
        chunk = seq[start:start + window]
        if shuffle:
            chunk = chunk[np.random.default_rng([seed, epoch, rank, w]).permutation(len(chunk))]
        windows.append(chunk)
    return windows


@dataclasses.dataclass(frozen=True)
class _Task:
    indices: np.ndarray  # global indices in output order
    views: np.ndarray | None  # chosen view per sample (view="random" with 2 views)
    slot: int | None = None  # the shared window buffer a worker gathers into (cache/shm.py)
    then: np.ndarray | None = None  # the window the same process fetches next: read ahead


class _BufferPool:
    """Hands out output arrays, reusing one only when nothing outside the pool refers to
    it any more (CPython reference counts are exact; a batch tensor made by
    torch.from_numpy keeps its array alive). A fresh 400 MB window costs the kernel a
    page-zeroing pass that halves the copy rate (docs/performance.md)."""

    def __init__(self, max_per_shape: int = 4):
        self.max_per_shape = max_per_shape
        self.arrays: dict[tuple, list[np.ndarray]] = {}
        self._free = self._calibrate()

    @staticmethod
    def _count(held: list[np.ndarray]) -> list[int]:
        return [sys.getrefcount(a) for a in held]  # the same code path for both uses

    @classmethod
    def _calibrate(cls) -> int | None:
        """The reference count an unreferenced pooled array shows here, or None (no
        recycling) if an outside reference would not raise it: interpreters differ."""
        held = [np.empty(1)]
        free = cls._count(held)[0]
        outside = held[0]
        if cls._count(held)[0] != free + 1:
            return None
        del outside
        return free

    def free(self, held: list[np.ndarray]) -> list[bool]:
        """Which of `held` nothing outside the pool refers to (all False if unknown)."""
        return [refs == self._free for refs in self._count(held)]

    def __call__(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        held = self.arrays.setdefault((shape, np.dtype(dtype).str), [])
        for a, free in zip(held, self.free(held)):
            if free:
                return a
        a = np.empty(shape, dtype)
        if len(held) < self.max_per_shape:
            held.append(a)
        return a

    def __getstate__(self) -> dict:
        return {"max_per_shape": self.max_per_shape, "arrays": {}, "_free": self._free}


class _WindowFetcher(Dataset):
    """Map-style dataset whose 'indices' are window tasks; opened lazily per process."""

    def __init__(self, ds: CacheDataset, cfg: LoaderConfig):
        self.ds, self.cfg = ds, cfg
        fields = list(cfg.fields)
        missing = [f for f in fields if f != INDEX and f not in ds.spec.fields]
        if missing:
            raise ValueError(f"{ds.root} holds no {missing} (it has {list(ds.spec.fields)})"
                             + (": encode one with `pipeline encode --teacher-attn ...`"
                                if ATTN in missing else ""))
        fields += [SCALES[f] for f in fields if f in SCALES and SCALES[f] in ds.spec.fields]
        self.read_fields = [f for f in fields if f != INDEX]
        self.random_views = ds.spec.views > 1 and cfg.view == "random"
        quantized = {n for pair in SCALES.items() if pair[1] in ds.spec.fields
                     for n in pair} if cfg.dequantize else set()  # int8 and their scales
        # fields whose stored rows are the output rows (at most a size-1 view axis apart):
        # in a worker they are gathered straight into the shared window buffer
        self.in_place = [f for f in self.read_fields if f not in quantized and (
            f not in _VIEW_FIELDS or cfg.view == "all" or ds.spec.views == 1)]
        self.pool = _BufferPool()
        self.slots: WindowSlots | None = None  # set by CacheLoader when workers run
        self.threads = cfg.copy_threads or (1 if cfg.num_workers else min(4, _cores()))

    def window_layout(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every tensor a window of n samples comes back as."""
        specs = self.ds.spec.fields
        out = {}
        for name in self.read_fields:
            shape = specs[name].shape
            if name in _VIEW_FIELDS and self.cfg.view != "all":
                shape = shape[1:]
            out[name] = ((n, *shape), np.dtype(specs[name].dtype))
        if INDEX in self.cfg.fields:
            out[INDEX] = ((n,), np.dtype(np.int64))
        if self.random_views:
            out["view"] = ((n,), np.dtype(np.int64))
        if self.cfg.dequantize:
            for name, scale in SCALES.items():
                if scale in out:
                    out[name] = (out[name][0], np.dtype(np.float16))
                    del out[scale]
        return out

    def __getitem__(self, task: _Task) -> dict[str, Any]:
        writer = None
        if task.slot is not None:
            writer = SlotWriter(self.slots.worker_array(task.slot))
            raw = self.ds.gather(task.indices, self.in_place, alloc=writer.alloc,
                                 threads=self.threads, then=task.then)
            rest = [f for f in self.read_fields if f not in raw]  # computed, then copied
            if rest:
                raw.update(self.ds.gather(task.indices, rest, alloc=self.pool,
                                          threads=self.threads, then=task.then))
        else:
            raw = self.ds.gather(task.indices, self.read_fields, alloc=self.pool,
                                 threads=self.threads, then=task.then)
        out: dict[str, Any] = {}
        for name, a in raw.items():
            if name in _VIEW_FIELDS and self.cfg.view != "all":
                a = a[:, 0] if task.views is None else a[np.arange(len(a)), task.views]
            out[name] = a
        if INDEX in self.cfg.fields:
            out[INDEX] = task.indices.copy()
        if task.views is not None:
            out["view"] = task.views.astype(np.int64)
        if self.cfg.dequantize:
            for name, scale in SCALES.items():
                if scale in out:
                    out[name] = dequantize_tokens(out[name], out.pop(scale)).numpy()
        if writer is None:
            return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in out.items()}
        for name, a in out.items():
            writer.put(name, a)
        return {_SLOT: task.slot, "fields": writer.fields}


class _TaskSampler:
    """Yields the current epoch's remaining window tasks; read anew at each iter().
    `assign` gives each task its shared window buffer as the DataLoader sends it out."""

    def __init__(self, assign: Callable[[_Task], _Task] | None = None):
        self.tasks: list[_Task] = []
        self.assign = assign

    def __iter__(self):
        return iter(self.tasks) if self.assign is None else map(self.assign, self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


class CacheLoader:
    """Iterates one epoch of batches (dicts of tensors) per `for` loop, then advances.

    Every rank gets len(loader) batches per epoch; state_dict()/load_state_dict() resume
    exactly after the last batch handed out, with any number of workers.
    """

    def __init__(self, cache: str | os.PathLike | CacheDataset, config: LoaderConfig | None = None,
                 *, rank: int = 0, world_size: int = 1, streams: int | None = None):
        self.cfg = config or LoaderConfig()
        self.ds = cache if isinstance(cache, CacheDataset) else open_cache(
            cache, backend=self.cfg.backend, verify_reads=self.cfg.verify)
        if self.ds.verify_reads and not self.cfg.verify:  # a copy: the caller's stays as it is
            self.ds = copy.copy(self.ds)
            self.ds.verify_reads, self.ds._reader = False, None
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.streams = streams or world_size
        per_rank, bad = divmod(self.streams, world_size)
        if bad or self.cfg.batch_size % per_rank:
            raise ValueError(f"streams={self.streams} must be a multiple of world_size="
                             f"{world_size} and streams / world_size must divide the batch "
                             f"size {self.cfg.batch_size}")
        self.own = range(rank * per_rank, (rank + 1) * per_rank)  # this rank's streams
        self.epoch, self.batch_in_epoch = 0, 0
        self._fetcher = _WindowFetcher(self.ds, self.cfg)
        pin = self.cfg.pin_memory if self.cfg.pin_memory is not None else torch.cuda.is_available()
        workers = self.cfg.num_workers
        self._slots, self._in_flight, self._pinned, self._closed = None, set(), set(), False
        self._copying: dict[int, Any] = {}  # pinned slot -> CUDA event after its copies
        if workers:
            # every window in flight, the one being consumed and one the consumer holds
            layout = self._fetcher.window_layout(self.cfg.shuffle_buffer)
            self._slots = WindowSlots(
                workers * self.cfg.prefetch_factor + 3,
                sum(aligned(math.prod(shape) * dt.itemsize) for shape, dt in layout.values()))
            self._fetcher.slots = self._slots
            self._refs = _BufferPool()
        # with workers, batches come from the slots, page-locked in place where CUDA is
        # (DataLoader's own pinning would copy every window once more)
        self._pin_slots = self._pin_workers = pin and workers > 0 and torch.cuda.is_available()
        self._sampler = _TaskSampler(self._assign_slot if workers else None)
        self._dl = DataLoader(
            self._fetcher, batch_size=None, sampler=self._sampler, num_workers=workers,
            pin_memory=pin and not workers, collate_fn=_identity,
            # its own generator: iter() must not draw from the global torch RNG, or a
            # resumed run's random stream (noise, t, label drop) would drift
            generator=torch.Generator().manual_seed(self.cfg.seed),
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            persistent_workers=workers > 0,
            multiprocessing_context=self.cfg.mp_context if workers else None)
        if len(self) == 0:
            raise ValueError(
                f"{self.ds.root}: {self.ds.num_valid} valid samples give no full batch of "
                f"{self.cfg.batch_size} per rank on {world_size} rank(s)")

    def _assign_slot(self, task: _Task) -> _Task:
        """The task with a free shared window buffer: none in flight, no batch cut from
        it still referenced (and, page-locked, no copy to the GPU from it still queued).
        If every one is held (a consumer keeping many batches), the worker returns its
        own tensors instead, as torch's workers do."""
        free = [k for k, ok in enumerate(self._refs.free(self._slots.arrays))
                if ok and k not in self._in_flight]
        k = self._copied(free)
        if k is None:
            return task
        self._slots.reserve(k)
        self._copying.pop(k, None)
        if self._pin_slots and k not in self._pinned:
            if self._slots.pin(k):
                self._pinned.add(k)
            else:  # CUDA refuses: windows are copied to pinned memory instead
                self._pin_slots = False
        self._in_flight.add(k)
        return dataclasses.replace(task, slot=k)

    def _copied(self, free: list[int]) -> int | None:
        """A slot of `free` whose batches' copies to the GPU are done. A consumer's
        `.to("cuda", non_blocking=True)` from a page-locked slot is only queued: an event
        recorded on the current stream once the slot is seen free completes after them."""
        pending = []
        for k in free:
            if k not in self._pinned or k not in self._copying:
                return k
            event = self._copying[k]
            if event is None:
                event = self._copying[k] = torch.cuda.Event()
                event.record()
            if event.query():
                return k
            pending.append(k)
        if not pending:
            return None
        self._copying[pending[0]].synchronize()
        return pending[0]

    def _from_slot(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A worker's window, as tensors over this process's mapping of its slot."""
        k = item[_SLOT]
        self._in_flight.discard(k)
        if k in self._pinned:
            self._copying[k] = None  # an event is recorded once no batch of it is held
        return {name: torch.from_numpy(slot_view(self._slots.arrays[k], *where))
                for name, where in item["fields"].items()}

    @property
    def stream_batch(self) -> int:
        """Samples each stream adds to a batch."""
        return self.cfg.batch_size // len(self.own)

    def _tasks(self, epoch: int, first: int) -> list[_Task]:
        """Window tasks from `first` on: each stream's windows are planned as those of a
        rank of `streams` (epoch_plan), with view draws seeded by the stream, and merged
        batch by batch (batch j = stream batch j of every stream this rank owns)."""
        c, k, b = self.cfg, len(self.own), self.stream_batch
        random_views = self.ds.spec.views > 1 and c.view == "random"
        plans = [epoch_plan(self.ds.valid_indices, batch_size=b, block_size=c.block_size,
                            window=c.shuffle_buffer // k, seed=c.seed, epoch=epoch, rank=s,
                            world_size=self.streams, shuffle=c.shuffle) for s in self.own]

        def merge(arrays: list[np.ndarray]) -> np.ndarray:
            return np.stack(arrays).reshape(k, -1, b).transpose(1, 0, 2).reshape(-1)
        tasks = []
        for w in range(first, len(plans[0])):
            views = None
            if random_views:
                views = merge([np.random.default_rng([c.seed, epoch, s, w, 1]).integers(
                    0, self.ds.spec.views, len(p[w])).astype(np.int64)
                    for s, p in zip(self.own, plans)])
            tasks.append(_Task(merge([p[w] for p in plans]), views))
        # window w is fetched by worker w % num_workers (or in process): it reads ahead
        # the next window that process fetches, while it copies and hands out this one
        step = max(1, self.cfg.num_workers)
        return [dataclasses.replace(t, then=tasks[w + step].indices)
                if w + step < len(tasks) else t for w, t in enumerate(tasks)]

    def __len__(self) -> int:
        """Batches per epoch on every rank (the same for every epoch)."""
        return batches_per_rank(self.ds.num_valid, block_size=self.cfg.block_size,
                                world_size=self.streams, batch_size=self.stream_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_in_epoch = int(epoch), 0

    def close(self) -> None:
        """Remove the shared window buffers now (else when the loader is garbage
        collected, or at exit). The loader cannot iterate afterwards."""
        if self._slots is not None:
            self._slots.close()
            self._closed = True

    def start(self) -> None:
        """Start the worker processes and wait until they are ready, reading nothing
        (they start at the first iteration otherwise: seconds for torch's imports)."""
        if self.cfg.num_workers:
            self._sampler.tasks = []
            for _ in range(2):  # two empty epochs: the second waits until each worker
                for _ in self._dl:  # has answered (persistent workers resume)
                    pass

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._closed:
            raise ValueError("this CacheLoader was closed")
        B, M = self.cfg.batch_size, self.cfg.shuffle_buffer // self.cfg.batch_size
        epoch = self.epoch
        first, skip = divmod(self.batch_in_epoch, M)
        self._sampler.tasks = self._tasks(epoch, first)
        # a new iter() finishes every task of an earlier one before it sends new ones
        # (persistent workers): no slot is in flight any more
        self._in_flight.clear()
        items = iter(self._dl)
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except CacheError as e:  # raised in a worker: keep its one-line message
                raise type(e)(_worker_message(e)) from None
            pinned = False
            if _SLOT in item:
                pinned = item[_SLOT] in self._pinned
                item = self._from_slot(item)
            if self._pin_workers and not pinned:
                item = {k: v.pin_memory() for k, v in item.items()}
            n = len(next(iter(item.values()))) // B
            for m in range(skip, n):
                self.batch_in_epoch += 1
                yield {k: v[m * B:(m + 1) * B] for k, v in item.items()}
            skip = 0
        self.epoch, self.batch_in_epoch = epoch + 1, 0

    # --------------------------------------------------------------- resume
    def _plan_identity(self) -> dict[str, Any]:
        c = self.cfg
        return {"seed": c.seed, "batch_size": c.batch_size, "block_size": c.block_size,
                "shuffle_buffer": c.shuffle_buffer, "shuffle": c.shuffle, "view": c.view,
                "rank": self.rank, "world_size": self.world_size, "streams": self.streams,
                "num_valid": self.ds.num_valid}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                **self._plan_identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._plan_identity()
        state = {"streams": state.get("world_size"), **state}  # saved before streams existed
        diff = [f"{k}: saved {state.get(k)!r} vs now {v!r}" for k, v in mine.items()
                if state.get(k) != v]
        if diff:
            raise ValueError("loader state was saved with another plan; exact resume needs "
                             "the same cache, seed, sizes and ranks:\n  " + "\n  ".join(diff))
        epoch, batch = state.get("epoch"), state.get("batch_in_epoch")
        # a checkpoint taken after an epoch's last batch records batch_in_epoch == len(self)
        # (the next batch starts the next epoch), hence <=
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"loader epoch={str(epoch)[:30]} is not an integer >= 0: the "
                             "saved loader state is damaged (resume from an earlier checkpoint)")
        if type(batch) is not int or not 0 <= batch <= len(self):
            raise ValueError(f"loader batch_in_epoch={str(batch)[:30]} is not an integer in "
                             f"[0, {len(self)}] (batches per epoch): the saved loader state "
                             "is damaged (resume from an earlier checkpoint)")
        self.epoch, self.batch_in_epoch = epoch, batch


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1


def _identity(x):
    return x


def _worker_message(e: Exception) -> str:
    """The original message of an error a DataLoader worker raised: torch re-raises it
    in the main process with the worker's whole traceback as the message."""
    text = str(e)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = type(e).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
