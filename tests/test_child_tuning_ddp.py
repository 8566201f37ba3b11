"""ChildTuningAdamW under data parallelism: two gloo processes on CPU (and, in the GPU lane, two processes on
CUDA: NCCL when there are two devices, else gloo on CUDA tensors sharing one device).

* DistributedDataParallel: every rank draws the same F masks (the stream depends only on seed, step,
  parameter index and element index), so all ranks end with identical parameters, equal to one process
  stepping on the averaged gradients.
* FSDP2 (``fully_shard``, parameters are DTensors sharded along dim 0): each rank updates its shard and
  draws the bits of the shard's global element indices, so the run equals the unsharded one; D-mode
  masks given for the full parameters are cut to the shards.
"""

import pathlib
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import apt_kernels as ak

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, STEPS, BATCH = 2, 4, 6
OPT = dict(lr=1e-2, weight_decay=0.01, reserve_p=0.3, seed=7)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # 9 and 3 rows: shards of 5 + 4 and 2 + 1 rows, uneven on purpose
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def full_masks(model) -> dict:
    g = torch.Generator().manual_seed(3)
    return {p: (torch.rand(p.shape, generator=g) < 0.4).to(p.device) for p in model.parameters() if p.dim() == 2}


def train(model, forward, mode: str, rank: int | None) -> None:
    """STEPS steps; rank None: one process on the batches of every rank (the mean of their losses)."""
    opt = ak.ChildTuningAdamW(model.parameters(), mode=mode, masks=full_masks(model) if mode == "D" else None, **OPT)
    device = next(model.parameters()).device
    for step in range(STEPS):
        ranks = range(WORLD) if rank is None else [rank]
        xs, ys = zip(*(batch(step, r) for r in ranks))
        F.cross_entropy(forward(torch.cat(xs).to(device)), torch.cat(ys).to(device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _worker(rank: int, init_file: str, out_dir: str, device_type: str) -> None:
    torch.set_num_threads(1)
    if device_type == "cuda":  # NCCL needs a device per rank; with one GPU both ranks share it through gloo
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {"backend": backend}
        for mode in ("F", "D"):
            model = make_model().to(device)
            ids = [device] if device_type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
            train(model, ddp, mode, rank)
            results[f"ddp_{mode}"] = [p.detach().cpu().clone() for p in model.parameters()]

        if device_type == "cpu":
            from torch.distributed.fsdp import fully_shard

            for mode in ("F", "D"):
                model = make_model()
                fully_shard(model[0])
                fully_shard(model)
                train(model, model, mode, rank)
                results[f"fsdp_{mode}"] = [p.full_tensor().detach().clone() for p in model.parameters()]
        torch.save(results, pathlib.Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(directory: pathlib.Path, device_type: str) -> list[dict]:
    ctx = mp.spawn(_worker, args=(str(directory / "init"), str(directory), device_type), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the data-parallel workers did not finish in 240 s")
    return [torch.load(directory / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(tmp_path_factory.mktemp("ddp"), "cpu")


def single_process(mode: str, device="cpu") -> list[torch.Tensor]:
    model = make_model().to(device)
    train(model, model, mode, None)
    return [p.detach().cpu() for p in model.parameters()]


def check_ddp(results: list[dict], device: str) -> None:
    """Identical parameters on both ranks (same masks, same all-reduced gradients), equal to one process on
    the averaged gradients up to the order of the averaging, in modes F and D."""
    start = [p.detach() for p in make_model().parameters()]
    for mode in ("F", "D"):
        for a, b in zip(results[0][f"ddp_{mode}"], results[1][f"ddp_{mode}"]):
            assert torch.equal(a, b), mode
        for got, want, p0 in zip(results[0][f"ddp_{mode}"], single_process(mode, device), start):
            assert not torch.equal(got, p0)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ddp_ranks_agree_and_equal_one_process(ranks):
    check_ddp(ranks, "cpu")


@pytest.mark.gpu
def test_ddp_on_cuda_ranks_agree_and_equal_one_process(tmp_path):
    """The CUDA backends under DDP: NCCL with two GPUs, else gloo with both ranks on one GPU."""
    results = spawn_ranks(tmp_path, "cuda")
    assert results[0]["backend"] == ("nccl" if torch.cuda.device_count() >= WORLD else "gloo")
    check_ddp(results, "cuda")


@pytest.mark.parametrize("mode", ["F", "D"])
def test_fsdp2_shards_draw_the_unsharded_masks(ranks, mode):
    for a, b in zip(ranks[0][f"fsdp_{mode}"], ranks[1][f"fsdp_{mode}"]):
        assert torch.equal(a, b)
    for got, want in zip(ranks[0][f"fsdp_{mode}"], single_process(mode)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_local_masks_would_differ():
    """The check above has teeth: an F run whose shards drew from local indices would not match."""
    from apt_kernels.child_tuning import keep_mask

    full = keep_mask(7, 1, 0, (9, 6), 0.3)
    shard1 = keep_mask(7, 1, 0, (4, 6), 0.3, offset=5 * 6)
    assert torch.equal(full[5:], shard1)
    assert not torch.equal(full[5:], keep_mask(7, 1, 0, (4, 6), 0.3))
