"""The training loader: determinism, rank splits, exact resume, field selection, views."""

import shutil

import numpy as np
import pytest
import torch

from cache import CacheLoader, DamagedCacheError, LoaderConfig, epoch_plan, open_cache
from cache.loader import batches_per_rank
from conftest import expected


def _indices(loader, n=None):
    out = []
    for b, batch in enumerate(loader):
        out.append(batch["index"].tolist())
        if n is not None and b + 1 == n:
            break
    return out


def cfg(**kw):
    base = dict(batch_size=4, block_size=4, shuffle_buffer=8,
                fields=("moments", "tokens", "cls", "label", "index"))
    return LoaderConfig(**{**base, **kw})


@pytest.fixture
def cache_path(make_cache):
    return make_cache(failures={6: "corrupt"})[0]


def test_batches_hold_the_right_samples(cache_path, spec):
    loader = CacheLoader(cache_path, cfg())
    assert len(loader) == 69 // 4
    for batch in loader:
        assert batch["moments"].shape == (4, 8, 4, 4) and batch["moments"].dtype == torch.float16
        assert batch["tokens"].shape == (4, 16, 24) and batch["cls"].shape == (4, 24)
        for row, i in enumerate(batch["index"].tolist()):
            want = expected(spec, i)
            np.testing.assert_array_equal(batch["moments"][row].numpy(), want["moments"][0])
            assert batch["label"][row].item() == want["label"]


def test_deterministic_per_seed_and_epoch(cache_path):
    a = _indices(CacheLoader(cache_path, cfg(seed=1)))
    b = _indices(CacheLoader(cache_path, cfg(seed=1)))
    c = _indices(CacheLoader(cache_path, cfg(seed=2)))
    assert a == b and a != c
    loader = CacheLoader(cache_path, cfg(seed=1))
    e0, e1 = _indices(loader), _indices(loader)
    assert e0 == a and e1 != e0 and loader.epoch == 2
    flat = sum(e0, [])
    assert len(flat) == len(set(flat)) and 6 not in flat  # no repeats, no failed sample


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_split_equal_disjoint_and_covering(cache_path, world):
    per_rank = [sum(_indices(CacheLoader(cache_path, cfg(), rank=r, world_size=world)), [])
                for r in range(world)]
    n_batches = {len(x) // 4 for x in per_rank}
    assert len(n_batches) == 1  # the same number of batches on every rank
    flat = sum(per_rank, [])
    assert len(flat) == len(set(flat))  # disjoint
    valid = 69
    # covering: only the remainder that does not fill a batch on every rank is dropped
    assert valid - len(flat) < world * (4 + 4)


def test_batch_count_is_the_same_every_epoch_and_rank():
    valid = np.arange(1000)
    for world in (1, 3, 7):
        for epoch in range(5):
            counts = {sum(map(len, epoch_plan(valid, batch_size=16, block_size=8, window=64,
                                              seed=0, epoch=epoch, rank=r,
                                              world_size=world)))
                      for r in range(world)}
            assert counts == {16 * batches_per_rank(1000, block_size=8, world_size=world,
                                                    batch_size=16)}


@pytest.mark.parametrize("workers_before, workers_after", [(0, 2), (2, 0)])
def test_exact_resume_when_the_number_of_workers_changes(cache_path, workers_before,
                                                         workers_after):
    full = CacheLoader(cache_path, cfg(num_workers=0))
    reference = [_indices(full) for _ in range(2)]  # two epochs, uninterrupted
    first = CacheLoader(cache_path, cfg(num_workers=workers_before))
    taken = _indices(first, n=7)  # stop mid-epoch, mid-window (7 = 3 windows + 1)
    state = first.state_dict()
    assert state["batch_in_epoch"] == 7
    resumed = CacheLoader(cache_path, cfg(num_workers=workers_after))
    resumed.load_state_dict(state)
    rest = _indices(resumed)
    assert taken + rest == reference[0]
    assert _indices(resumed) == reference[1]  # and the next epoch continues identically


def test_resume_refuses_another_plan(cache_path):
    state = CacheLoader(cache_path, cfg()).state_dict()
    other = CacheLoader(cache_path, cfg(seed=5))
    with pytest.raises(ValueError, match="seed: saved 0 vs now 5"):
        other.load_state_dict(state)


def test_workers_give_the_same_batches_and_tensors(cache_path):
    a = list(CacheLoader(cache_path, cfg(num_workers=0)))
    b = list(CacheLoader(cache_path, cfg(num_workers=2)))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k])


def test_reads_only_requested_fields(make_cache):
    """A plain SiT run reads moments and labels: remove the tokens and it still works."""
    path, _ = make_cache(backends=("zarr",))
    shutil.rmtree(path / "zarr" / "tokens" / "c")
    shutil.rmtree(path / "zarr" / "cls" / "c")
    batches = list(CacheLoader(path, cfg(fields=("moments", "label"))))
    assert set(batches[0]) == {"moments", "label"} and len(batches) == 70 // 4
    with pytest.raises(DamagedCacheError, match="zarr/tokens/c/0"):
        list(CacheLoader(path, cfg(fields=("moments", "tokens"))))


def test_int8_tokens_dequantized_and_views_chosen_once_per_sample(make_cache):
    path, spec = make_cache(token_dtype="int8", views=2)
    loader = CacheLoader(path, cfg(seed=3))
    views = []
    for batch in loader:
        assert batch["tokens"].dtype == torch.float16
        for row, (i, v) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist())):
            want = expected(spec, i)
            # moments, tokens and cls all come from the same view
            np.testing.assert_array_equal(batch["moments"][row].numpy(), want["moments"][v])
            np.testing.assert_array_equal(batch["cls"][row].numpy(), want["cls"][v])
            np.testing.assert_allclose(batch["tokens"][row].float().numpy(), want["tokens"][v],
                                       atol=0.02 * np.abs(want["tokens"][v]).max())
            views.append(v)
    assert 0.3 < np.mean(views) < 0.7
    raw = next(iter(CacheLoader(path, cfg(dequantize=False, view="all"))))
    assert raw["tokens"].dtype == torch.int8 and raw["tokens"].shape == (4, 2, 16, 24)
    assert raw["tokens_scale"].shape == (4, 2, 16)


def test_block_shuffle_mixes_classes():
    """ImageNet-like order (class by class): batches still see many classes."""
    labels = np.repeat(np.arange(100), 100)  # 10k samples stored class by class
    valid = np.arange(len(labels))
    windows = epoch_plan(valid, batch_size=256, block_size=8, window=1024, seed=0, epoch=0)
    batches = np.concatenate(windows).reshape(-1, 256)
    distinct = np.mean([len(np.unique(labels[b])) for b in batches])
    # iid sampling would give ~92 of 100 classes in 256 draws; blocks of 8 give ~70
    assert distinct > 60, distinct


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="shuffle_buffer=100.*multiple of batch_size=64"):
        LoaderConfig(batch_size=64, shuffle_buffer=100)
    with pytest.raises(ValueError, match="fields.*unknown \\['latents'\\]"):
        LoaderConfig(fields=("latents",))


def test_too_few_samples_for_one_batch(make_cache):
    path, _ = make_cache(num_samples=10)
    with pytest.raises(ValueError, match="give no full batch of 8 per rank on 2"):
        CacheLoader(path, cfg(batch_size=8, shuffle_buffer=8), rank=0, world_size=2)


def test_loader_on_partial_cache(make_cache):
    path, spec = make_cache(finalize=False)
    ds = open_cache(path, allow_partial=True)
    assert len(list(CacheLoader(ds, cfg()))) == 70 // 4


@pytest.mark.parametrize("workers", [0, 2])
def test_held_batches_are_never_overwritten_by_recycled_buffers(cache_path, spec, workers):
    """In process the pool, with workers the shared window buffers: a batch still held is
    never written again, also when the consumer holds more windows than there are slots."""
    loader = CacheLoader(cache_path, cfg(num_workers=workers))
    held = list(loader) + list(loader)  # two epochs of batches kept alive at once
    for batch in held:
        for row, i in enumerate(batch["index"].tolist()):
            np.testing.assert_array_equal(batch["moments"][row].numpy(),
                                          expected(spec, i)["moments"][0])


def test_released_buffers_are_recycled(cache_path):
    loader = CacheLoader(cache_path, cfg())
    for _ in range(3):
        for batch in loader:
            del batch
    pool = loader._fetcher.pool
    # windows of 8 samples (+ one shorter last window): at most two arrays per shape
    assert all(len(held) <= 2 for held in pool.arrays.values()), \
        {k: len(v) for k, v in pool.arrays.items()}


def _slot_of(loader, tensor):
    """The shared window buffer a tensor lies in, or None."""
    ptr = tensor.data_ptr()
    for k, a in enumerate(loader._slots.arrays):
        if a.ctypes.data <= ptr < a.ctypes.data + a.nbytes:
            return k
    return None


def test_workers_gather_into_shared_buffers_that_are_reused(cache_path, spec):
    """With workers, batches are views of the main process's mapping of the shared
    window buffers (no copy on the way back); a consumer that lets each batch go reuses
    a few of them, and every batch still holds the right samples."""
    loader = CacheLoader(cache_path, cfg(num_workers=2, prefetch_factor=1))
    # fp16 fields, one view: every field is gathered straight into the slot, none copied
    assert loader._fetcher.in_place == loader._fetcher.read_fields
    loader.start()  # the workers are up, nothing was read or reserved
    assert not any(loader._slots._reserved) and loader.batch_in_epoch == loader.epoch == 0
    used = set()
    for _ in range(3):
        for batch in loader:
            slots = {_slot_of(loader, batch[f]) for f in ("moments", "tokens", "index")}
            assert len(slots) == 1 and None not in slots, slots
            used |= slots
            for row, i in enumerate(batch["index"].tolist()):
                want = expected(spec, i)
                np.testing.assert_array_equal(batch["moments"][row].numpy(), want["moments"][0])
                np.testing.assert_array_equal(batch["tokens"][row].numpy(),
                                              want["tokens"][0].astype(np.float16))
            del batch
    # 2 in flight (workers x prefetch), the window being read, one the consumer held
    assert len(used) <= 4 < loader._slots.count + 1, used


@pytest.mark.parametrize("overrides, config", [
    (dict(token_dtype="int8", views=2), dict(seed=3)),                    # dequantized
    (dict(token_dtype="int8", views=2), dict(dequantize=False, view="all")),
    (dict(views=2), dict(view="first")),
    (dict(attn_blocks=(0, 1), attn_heads=2, attn_head_dim=4, attn_dtype="int8"),
     dict(fields=("moments", "tokens", "attn_qk", "label", "index"))),
])
def test_workers_equal_in_process_for_every_layout(make_cache, overrides, config):
    """Fields gathered in place and fields computed in the worker (dequantized, one view
    of two) come back from the shared buffers equal to the in-process loader's."""
    path, _ = make_cache(**overrides)
    a = list(CacheLoader(path, cfg(**config)))
    loader = CacheLoader(path, cfg(num_workers=2, **config))
    b = []
    for batch in loader:
        assert _slot_of(loader, batch["index"]) is not None or len(b) >= 8
        b.append({k: v.clone() for k, v in batch.items()})
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def test_shared_buffers_are_removed_with_the_loader(cache_path, tmp_path, monkeypatch):
    """The buffer files go when the loader is closed (or collected, or at exit); a
    directory whose owner died (its lock released) goes when the next loader starts, one
    whose lock is held stays (a loader in another container sharing /dev/shm); too little
    shared memory is one clear error."""
    import subprocess
    import sys
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("UREPA_SHM_DIR", str(shm))
    for name in ("urepa-loader-1-dead", "urepa-loader-1-held"):
        (shm / name).mkdir()
        (shm / name / "lock").touch()
    holder = subprocess.Popen(  # holds the second directory's lock until told to stop
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(shm / "urepa-loader-1-held" / "lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        loader = CacheLoader(cache_path, cfg(num_workers=1))
        batches = iter(loader)
        assert next(batches)["index"].shape == (4,)
        batches.close()  # a suspended iteration refers to its loader
        del batches
        slot_dir = loader._slots.dir
        assert sorted(p.name for p in shm.iterdir()) == sorted([slot_dir.name,
                                                                "urepa-loader-1-held"])
    finally:
        holder.communicate("")
    loader.close()
    assert not slot_dir.exists()
    with pytest.raises(ValueError, match="closed"):
        next(iter(loader))
    import cache.shm
    monkeypatch.setattr(cache.shm.shutil, "disk_usage",
                        lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(MemoryError, match="need .* MiB of shared memory .* --shm-size"):
        CacheLoader(cache_path, cfg(num_workers=2, shuffle_buffer=4096))


def test_streams_make_the_global_batch_independent_of_the_rank_count(make_cache):
    """With streams=4, step j's global batch (every rank's batch, in rank order) is the
    same on 1, 2 and 4 ranks, views included; each rank's batch holds its streams' parts."""
    path, spec = make_cache(num_samples=300, views=2)
    global_batches = {}
    for world in (1, 2, 4):
        per_rank = []
        for rank in range(world):
            cfg = LoaderConfig(batch_size=16 // world, shuffle_buffer=32 // world,
                               block_size=2, fields=("index", "label"))
            loader = CacheLoader(path, cfg, rank=rank, world_size=world, streams=4)
            assert len(loader) == 300 // 2 // 4 * 2 // 4   # 18 blocks of 2 per stream
            per_rank.append([(b["index"], b["view"]) for b in loader])
        global_batches[world] = [(torch.cat([r[j][0] for r in per_rank]),
                                  torch.cat([r[j][1] for r in per_rank]))
                                 for j in range(len(per_rank[0]))]
    for world in (2, 4):
        for (i1, v1), (i2, v2) in zip(global_batches[1], global_batches[world], strict=True):
            assert torch.equal(i1, i2) and torch.equal(v1, v2)
    seen = torch.cat([i for i, _ in global_batches[1]])
    assert len(set(seen.tolist())) == len(seen)                       # no repeats in an epoch
    with pytest.raises(ValueError, match="streams=3 must be a multiple of world_size=2"):
        CacheLoader(path, LoaderConfig(batch_size=8, shuffle_buffer=8), world_size=2,
                    streams=3)
