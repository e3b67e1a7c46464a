"""SophiaG in Lightning's automatic optimization: one callback, a training_step returning a dict."""

import lightning as L
import torch
import torch.nn.functional as F

import curvlab
from curvlab.integrations.lightning import CurvatureCallback


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return {"loss": loss, "logits": logits}  # SophiaG samples labels from the logits

    def configure_optimizers(self):
        return curvlab.optim.Sophia(self.parameters(), lr=1e-2, update_period=5, seed=0)


g = torch.Generator().manual_seed(0)
x, y = torch.randn(256, 8, generator=g), torch.randint(0, 4, (256,), generator=g)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
trainer = L.Trainer(max_epochs=2, callbacks=[CurvatureCallback()], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
trainer.fit(Classifier(), loader)
print("final loss", float(trainer.callback_metrics["train_loss"]))
