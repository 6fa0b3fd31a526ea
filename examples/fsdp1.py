# FSDP1 (FullyShardedDataParallel, use_orig_params=True) + Mechanic: detected, one all-reduce per step.
# Run: torchrun --standalone --nproc-per-node 2 examples/fsdp1.py
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
import manic

if torch.cuda.is_available():
    device, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), "nccl"
    torch.cuda.set_device(device)
else:
    device, backend = torch.device("cpu"), "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
# device_id: where FSDP puts the model (on CPU it must be given as torch.device("cpu"))
model = FSDP(model, use_orig_params=True, device_id=device)
opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))  # after wrapping
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)

torch.manual_seed(1 + rank)  # each rank its own batch of a learnable task
X = torch.randn(128, 16, device=device)
y = X.sin().sum(dim=1, keepdim=True)
for step in range(30):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X), y).backward()
    opt.step()
    sched.step()

if rank == 0:
    print(f"scale {opt.scale.item():.4g}")
dist.destroy_process_group()
