# HSDP + Mechanic: fully_shard on a 2-D (replicate, shard) mesh; Mechanic reduces over the shard dim only.
# Run: torchrun --standalone --nproc-per-node 4 examples/hsdp.py
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import manic

if torch.cuda.is_available():
    device, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), "nccl"
    torch.cuda.set_device(device)
else:
    device, backend = torch.device("cpu"), "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()
mesh = init_device_mesh(device.type, (2, 2), mesh_dim_names=("replicate", "shard"))  # 2 replicas x 2 shards

torch.manual_seed(0)
blocks = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(3)]
model = torch.nn.Sequential(*blocks, torch.nn.Linear(16, 1)).to(device)
for block in model:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))  # after sharding

torch.manual_seed(1 + rank)  # each rank its own batch of a learnable task
X = torch.randn(128, 16, device=device)
y = X.sin().sum(dim=1, keepdim=True)
for step in range(30):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X), y).backward()
    opt.step()

if rank == 0:
    print(f"scale {opt.scale.item():.4g}")
dist.destroy_process_group()
