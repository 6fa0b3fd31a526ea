# FSDP2 + Mechanic (built after sharding), then a DCP checkpoint loaded into a fresh model and optimizer.
# Run: torchrun --standalone --nproc-per-node 2 examples/fsdp2.py
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
import manic

if torch.cuda.is_available():
    device, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), "nccl"
    torch.cuda.set_device(device)
else:
    device, backend = torch.device("cpu"), "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()
torch.manual_seed(1 + rank)  # each rank its own batch of a learnable task
X = torch.randn(128, 16, device=device)
y = X.sin().sum(dim=1, keepdim=True)


def build():
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(3)]
    model = torch.nn.Sequential(*blocks, torch.nn.Linear(16, 1)).to(device)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    return model, manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))  # after sharding


def train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()


model, opt = build()
train(model, opt, 30)
path = [tempfile.mkdtemp() if rank == 0 else None]
dist.broadcast_object_list(path)  # one checkpoint directory for all ranks
dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
         checkpoint_id=path[0])

model2, opt2 = build()  # resume: a fresh model and optimizer (on this or another number of ranks)
state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
dcp.load(state, checkpoint_id=path[0])
set_model_state_dict(model2, state["model"])
set_optimizer_state_dict(model2, opt2, state["optim"])

train(model2, opt2, 1)
train(model, opt, 1)
assert torch.equal(opt2.scale, opt.scale)  # on the same number of ranks the resume is bitwise
dist.barrier()  # every rank is done with the checkpoint
if rank == 0:
    shutil.rmtree(path[0])
    print(f"resumed from DCP, scale {opt2.scale.item():.4g}")
dist.destroy_process_group()
