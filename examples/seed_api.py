# The seed API (Updater + Mechanic) with a checkpoint: the resumed run matches an uninterrupted one bitwise.
# Run: python examples/seed_api.py
import os
import tempfile

import torch
from manic import Mechanic, Updater

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
X = torch.randn(256, 8, device=device)
y = X @ torch.randn(8, 1, device=device)


def build():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=60)
    updater = Updater(optimizer, lr_scheduler)
    mechanic = Mechanic(updater)
    return model, updater, mechanic


def train(model, updater, mechanic, steps):
    for _ in range(steps):
        updater.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        mechanic.step()   # tuner update from the gradients
        updater.step()    # base step, Mechanic's rebase, then the scheduler


model, updater, mechanic = build()
train(model, updater, mechanic, 60)  # uninterrupted

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "checkpoint.pt")
    model2, updater2, mechanic2 = build()
    train(model2, updater2, mechanic2, 30)
    torch.save({"model": model2.state_dict(), "updater": updater2.state_dict(),
                "mechanic": mechanic2.state_dict()}, path)

    model3, updater3, mechanic3 = build()  # e.g. in a new process
    checkpoint = torch.load(path, weights_only=True)
    model3.load_state_dict(checkpoint["model"])
    updater3.load_state_dict(checkpoint["updater"])
    mechanic3.load_state_dict(checkpoint["mechanic"])
    train(model3, updater3, mechanic3, 30)

assert torch.equal(mechanic3.scale, mechanic.scale)
assert all(torch.equal(a, b) for a, b in zip(model3.parameters(), model.parameters()))
print(f"resumed run is bitwise identical, scale {mechanic.scale.item():.4g}")
