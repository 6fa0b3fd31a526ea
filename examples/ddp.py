# Mechanic under DDP: the parameters are replicated, so Mechanic adds no collective of its own.
# Run: torchrun --standalone --nproc-per-node 2 examples/ddp.py
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import manic

if torch.cuda.is_available():
    device, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), "nccl"
    torch.cuda.set_device(device)
else:
    device, backend = torch.device("cpu"), "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()

torch.manual_seed(0)
w = torch.randn(8, 1)
torch.manual_seed(1 + rank)  # each rank its own batch of the same regression task
X = torch.randn(128, 8)
X, y = X.to(device), (X @ w).to(device)

model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # copies rank 0's weights
opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)

for step in range(60):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X), y).backward()  # DDP averages the gradients
    opt.step()
    sched.step()

if rank == 0:
    print(f"scale {opt.scale.item():.4g}")
dist.destroy_process_group()
