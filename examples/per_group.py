# A tuner per layer: manic.layer_groups puts each weight matrix and the vectors after it in a param
# group of its own, and per_group=True gives every group its own scale (still one all-reduce a step).
# Run: python examples/per_group.py
import torch
import manic

torch.manual_seed(0)
X = torch.randn(256, 16)
y = torch.sin(X[:, :4]).sum(1, keepdim=True)

model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                            torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
groups = manic.layer_groups(model.parameters())  # 3 groups: [W, b, norm w, norm b], [W, b], [W, b]
opt = manic.mechanize(torch.optim.AdamW(groups, lr=1e-3), per_group=True)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)

for step in range(200):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), y)
    loss.backward()
    opt.step()
    sched.step()

# opt.scale holds one scale per param group; opt.effective_lr one S_i * lr_i per group
scales = opt.scale.tolist()
print(f"loss {loss.item():.4g}, per-group scales {[round(s, 3) for s in scales]}, smallest scale {min(scales):.4g}")
