# PyTorch Lightning + Mechanic: configure_optimizers returns the mechanized optimizer and its scheduler.
# Run: python examples/lightning_trainer.py
import lightning as L
import torch
import manic


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = manic.mechanize(torch.optim.AdamW(self.parameters(), lr=1e-3))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


torch.manual_seed(0)
X = torch.randn(256, 8)
y = X @ torch.randn(8, 1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)

trainer = L.Trainer(max_steps=50, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Regression(), loader)
print(f"scale {trainer.optimizers[0].scale.item():.4g}")
