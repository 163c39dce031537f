"""Data-parallel K-FAC statistics (SPEC §2.4): two gloo processes give one process's factors.

The workers join through the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so ``init_from_env``, ``barrier`` and ``shutdown`` run as they do under torchrun.
They are forked where the platform can: a spawned worker re-imports torch and transformers and
rebuilds the model (measured 13-24 s for the pair on this loaded 2-core machine, against 0.4 s
forked); forked workers share the parent's model, so its weights are the same by construction.
Workers run one thread, so torch never enters an OpenMP region the parent may have started.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from crispedit.curvature import StatisticsError, collect
from crispedit.distributed import DistContext, DistributedError, backend_and_device, barrier, init_from_env, is_main, shard, shutdown
from crispedit.layers import find_modules
from dense import rel_err
from models import tiny_hf

WORLD = 2
VOCAB = 12  # exact labels: V × N backward vectors; a tiny vocabulary keeps them few
_gen = torch.Generator().manual_seed(0)
DOCS = [torch.randint(3, VOCAB, (int(n),), generator=_gen).tolist() for n in torch.randint(3, 13, (9,), generator=_gen)]
# (documents, labels, accumulation dtype) per job; every job runs in one process and in WORLD ranks.
JOBS = {
    "sampled": (DOCS, "sampled", torch.float32),
    "empirical": (DOCS, "empirical", torch.float32),
    "exact": (DOCS, "exact", torch.float32),
    "float64": (DOCS, "sampled", torch.float64),
    "uneven": (DOCS[:3], "sampled", torch.float32),  # 2 documents on one rank, 1 on the other
    "lonely": (DOCS[:1], "sampled", torch.float32),  # rank 1 has no document
}
# A float32 model: the ranks batch other documents together (other padded lengths, so other
# float32 kernels) and add the sums in another order, so factors agree to float32 rounding only
# (eps 1.2e-7; measured relative errors 1.4e-7 to 3.3e-7 across the jobs). The float64 job has the
# same float32 model underneath. A wrong count or shard-dependent labels are off by 1e-2 or more.
FLOAT32_TOL = 2e-6
SAME_META = ("corpus_fingerprint", "documents", "tokens", "labels", "mc_samples", "seed", "dtype", "layers", "format")


def _model():
    model = tiny_hf("llama", layers=2, dtype=torch.float32, vocab=VOCAB, seed=3)
    return model, find_modules(model, [0, 1])


def _collect(model, modules, job: str, batch_size: int, parallel=None, documents=None):
    docs, labels, dtype = JOBS[job]
    return collect(model, modules, documents or docs, labels=labels, mc_samples=2, seed=5, batch_size=batch_size,
                   dtype=dtype, parallel=parallel)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, model, modules) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = init_from_env("cpu")
    try:
        results = {}
        for job in JOBS:
            s = _collect(model, modules, job, batch_size=2, parallel=ctx)
            results[job] = (s.A, s.G, s.tokens, s.meta)
        # rank 1 reads another corpus with the same lengths: same counts, other fingerprint
        other = [list(d) for d in DOCS]
        if rank == 1:
            other[0][0] = (other[0][0] + 1) % VOCAB
        try:
            _collect(model, modules, "sampled", batch_size=2, parallel=ctx, documents=other)
            results["mismatch"] = None
        except StatisticsError as e:
            results["mismatch"] = str(e)
        results["is_main"] = is_main(ctx)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        barrier(ctx)
    finally:
        shutdown(ctx)


@pytest.fixture(scope="module")
def llama():
    return _model()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, llama):
    out = tmp_path_factory.mktemp("ranks")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out), *llama), nprocs=WORLD, start_method=method)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(llama):
    model, modules = llama
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {job: _collect(model, modules, job, batch_size=8) for job in JOBS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("job", list(JOBS))
def test_ranks_give_the_factors_of_one_process(ranks, single, job):
    one = single[job]
    A, G, tokens, meta = ranks[0][job]
    for n in one.A:
        assert A[n].dtype == one.A[n].dtype == JOBS[job][2]
        assert rel_err(A[n], one.A[n]) < FLOAT32_TOL, f"{n}.A"
        assert rel_err(G[n], one.G[n]) < FLOAT32_TOL, f"{n}.G"
    assert tokens == one.tokens
    assert {k: meta[k] for k in SAME_META} == {k: one.meta[k] for k in SAME_META}
    assert meta["world_size"] == WORLD and one.meta["world_size"] == 1
    # every rank divides the same reduced sums by the same count
    A1, G1, tokens1, meta1 = ranks[1][job]
    for n in A:
        assert torch.equal(A[n], A1[n]) and torch.equal(G[n], G1[n])
    assert tokens1 == tokens and meta1["tokens"] == meta["tokens"]


def test_the_split_changes_the_batches():
    """The comparison above would be vacuous if both ranks ran the single process's batches."""
    shards = shard([len(d) for d in DOCS], WORLD)
    assert all(shards) and sorted(sum(shards, [])) == list(range(len(DOCS)))
    assert shard([len(d) for d in DOCS[:1]], WORLD) == [[0], []]


def test_ranks_that_read_different_corpora_refuse(ranks):
    """Same lengths, so the same shards and counts: only the fingerprints differ; both ranks raise."""
    assert ranks[0]["mismatch"].startswith("rank 1 read another corpus than rank 0 (another corpus fingerprint)")
    assert ranks[1]["mismatch"].startswith("rank 0 read another corpus than rank 1 (another corpus fingerprint)")
    assert [r["is_main"] for r in ranks] == [True, False]


def test_shard_balances_tokens():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 200, (101,), generator=g).tolist()
    for world in (1, 2, 3, 7):
        shards = shard(lengths, world)
        assert sorted(sum(shards, [])) == list(range(len(lengths)))  # a partition
        loads = [sum(lengths[i] for i in s) for s in shards]
        assert max(loads) - sum(loads) / world <= max(lengths)  # the greedy bound
        for s in shards:
            assert [lengths[i] for i in s] == sorted((lengths[i] for i in s), reverse=True)
    assert shard(lengths, 1) == [sorted(range(len(lengths)), key=lambda i: -lengths[i])]
    # a round-robin split of sorted lengths would put the longest of every pair on rank 0
    assert shard([10, 9, 9, 1], 2) == [[0, 3], [1, 2]]
    assert shard([], 3) == [[], [], []]


def test_a_rank_without_a_process_group_refuses(llama):
    with pytest.raises(StatisticsError, match="process group is not initialised"):
        _collect(*llama, "sampled", batch_size=2, parallel=DistContext(0, WORLD))


def test_backend_and_device():
    assert backend_and_device("cpu", 1, True, 2) == ("gloo", "cpu")
    assert backend_and_device("auto", 1, False) == ("gloo", "cpu")
    assert backend_and_device("auto", 1, True, 2) == ("nccl", "cuda:1")
    assert backend_and_device("cuda", 0, True, 1) == ("nccl", "cuda:0")
    for device, cuda, count in (("cuda:1", True, 2), ("cuda", False, 0), ("cuda", True, 1), ("mps", False, 0)):
        with pytest.raises(DistributedError):
            backend_and_device(device, 1, cuda, count)


def test_without_torchrun_nothing_starts(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cpu") is None and is_main(None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env("cpu") is None
    barrier(None)
    shutdown(None)
