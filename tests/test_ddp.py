"""BAM under distributed training on CPU: SyncBatchNorm conversion, and a 2-process DDP step over gloo.

What happens on CPU (torch 2.x): ``convert_sync_batchnorm`` converts BAM's BatchNorm1d (its input is 2-D, (N, C/r))
and BatchNorm2d alike, and SyncBatchNorm accepts 2-D input. With no process group it behaves like plain BatchNorm;
inside an initialised process group, in training mode, its forward raises ``ValueError: SyncBatchNorm expected input
tensor to be on GPU ...`` for CPU tensors. So CPU DDP trains with ordinary (per-process) BatchNorm; the DDP test
checks that too.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bam_triton import models

WORLD_SIZE = 2
BATCH = 8  # 4 per rank: BAM's BatchNorm1d needs >= 2 samples per process in training


def _model(seed=0):
    torch.manual_seed(seed)
    return models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, backend="torch")


def _batch():
    generator = torch.Generator().manual_seed(123)
    return torch.randn(BATCH, 3, 16, 16, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)


def test_convert_sync_batchnorm_converts_both_bam_norms():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
    for name, bam in models.bam_modules(model):
        norms = [m for m in bam.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 4 and all(isinstance(m, nn.SyncBatchNorm) for m in norms), name
        assert isinstance(bam.channel_att.gate_c.gate_c_bn_1, nn.SyncBatchNorm)  # was BatchNorm1d
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    assert sorted(model.state_dict()) == sorted(_model().state_dict())  # same keys: checkpoints still load


def test_sync_batchnorm_without_process_group_matches_batchnorm():
    """No process group: SyncBatchNorm (2-D input included) falls back to local statistics."""
    assert not dist.is_initialized()
    x, _ = _batch()
    reference = _model().train()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(_model()).train()
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.bam1.channel_att.gate_c.gate_c_bn_1.running_mean,
                               reference.bam1.channel_att.gate_c.gate_c_bn_1.running_mean)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        x, y = _batch()
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        # SyncBatchNorm inside a process group on CPU tensors: record what happens.
        sync_model = nn.SyncBatchNorm.convert_sync_batchnorm(_model()).train()
        try:
            sync_model(x[shard])
            sync_outcome = "ran"
        except ValueError as error:
            sync_outcome = f"ValueError: {error}"
        model = DistributedDataParallel(_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = nn.functional.cross_entropy(model(x[shard]), y[shard])
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        optimizer.step()
        params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
        torch.save({"grads": grads, "params": params, "sync_outcome": sync_outcome}, os.path.join(out_dir,
                                                                                                  f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow_on_gpu  # two spawned processes on CPU (gloo), in either run
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo")
def test_ddp_two_processes_on_cpu(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    # Every parameter, BAM's included, is identical on both ranks after the step.
    assert sorted(ranks[0]["params"]) == sorted(ranks[1]["params"])
    assert any(name.startswith("bam1.") for name in ranks[0]["params"])
    for name in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
    # The synced gradient is the mean of the per-process gradients, computed here without DDP.
    x, y = _batch()
    local = []
    for rank in range(WORLD_SIZE):
        model = _model()
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        local.append({name: p.grad for name, p in model.named_parameters()})
    differs = 0
    initial = dict(_model().named_parameters())
    for name, grad in ranks[0]["grads"].items():
        mean = (local[0][name] + local[1][name]) / 2
        # Tolerance for summation order only (the processes use 1 thread, this one 2); unsynced gradients differ by O(1).
        torch.testing.assert_close(grad, mean, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        differs += not torch.allclose(local[0][name], local[1][name])
        torch.testing.assert_close(ranks[0]["params"][name], initial[name].detach() - 0.1 * mean, atol=1e-5,
                                   rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert differs > 0  # the shards really gave different local gradients: averaging was needed
    # SyncBatchNorm in a CPU process group: torch refuses CPU tensors (see the module docstring).
    for rank in ranks:
        assert rank["sync_outcome"].startswith("ValueError") and "GPU" in rank["sync_outcome"]
