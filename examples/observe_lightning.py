# PyTorch Lightning: MechanicMonitor logs Mechanic's scale and effective lr through the attached loggers.
# Run: python examples/observe_lightning.py
import csv
import tempfile

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
import manic
from manic.integrations.lightning import MechanicMonitor


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

with tempfile.TemporaryDirectory() as tmp:
    logger = CSVLogger(tmp)  # or TensorBoardLogger, WandbLogger, ...
    trainer = L.Trainer(max_steps=50, log_every_n_steps=10, logger=logger, callbacks=[MechanicMonitor()],
                        accelerator="auto", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Regression(), loader)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        last = [row for row in csv.DictReader(f) if row["mechanic/scale"]][-1]

print(f"step {last['step']}: mechanic/effective_lr {float(last['mechanic/effective_lr']):.3g}, "
      f"scale {float(last['mechanic/scale']):.4g}")
