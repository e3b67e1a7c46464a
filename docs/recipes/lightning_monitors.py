"""Monitors into Lightning's logger: MonitorCallback logs every value through pl_module.log."""

import tempfile

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from curvlab.integrations.lightning import MonitorCallback
from curvlab.monitors import Sharpness

g = torch.Generator().manual_seed(0)
x, y = torch.randn(256, 8, generator=g), torch.randint(0, 4, (256,), generator=g)
net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


sharpness = Sharpness(net, F.cross_entropy, (x[:64], y[:64]), every=4)
logger = CSVLogger(tempfile.mkdtemp(), name="run")
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
trainer = L.Trainer(max_epochs=1, callbacks=[MonitorCallback([sharpness])], logger=logger,
                    log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
trainer.fit(Classifier(), loader)
print(sorted(k for k in trainer.logged_metrics if k.startswith("sharpness/")))
