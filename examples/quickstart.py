# Drop-in Mechanic: wrap any torch optimizer with manic.mechanize; schedulers work unchanged.
# Run: python examples/quickstart.py
import torch
import manic

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
X = torch.randn(256, 8, device=device)
y = X @ torch.randn(8, 1, device=device) + 0.1 * torch.randn(256, 1, device=device)  # learnable

model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)

for step in range(100):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), y)
    loss.backward()
    opt.step()
    sched.step()

# opt.scale is a 0-dim tensor on the device: Mechanic's step itself never syncs with the host
print(f"loss {loss.item():.4g}, scale {opt.scale.item():.4g}")
