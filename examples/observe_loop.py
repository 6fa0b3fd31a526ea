# A plain training loop: readout() gives Mechanic's scale and effective lr as floats, for TensorBoard or any logger.
# Run: python examples/observe_loop.py
import tempfile

import torch
from torch.utils.tensorboard import SummaryWriter
import manic
from manic.integrations import readout

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
X = torch.randn(256, 8)
y = X @ torch.randn(8, 1)
opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)

with tempfile.TemporaryDirectory() as logdir, SummaryWriter(logdir) as writer:
    for step in range(1, 201):
        loss = torch.nn.functional.mse_loss(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:  # between opt.step() and sched.step(): the lr this step used
            values = readout(opt)  # {"mechanic/scale": S, "mechanic/effective_lr": S * lr}: one host sync
            for name, value in values.items():
                writer.add_scalar(name, value, step)  # or wandb.log(values, step=step), ...
        sched.step()

print(f"step {step}: mechanic/effective_lr {values['mechanic/effective_lr']:.3g}, scale {values['mechanic/scale']:.4g}")
