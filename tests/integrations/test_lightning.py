"""Lightning: Sophia (G, H) and AdaHessian in automatic optimization, monitors into the logger."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.integrations._common import (
    OPTIMIZERS,
    REFRESH_STEPS,
    STEPS,
    Recorder,
    assert_same_trajectory,
    closure_trajectory,
)

pl = pytest.importorskip("lightning.pytorch", reason="lightning is an optional dependency")
from curvlab.integrations.lightning import CurvatureCallback, MonitorCallback  # noqa: E402

DT = torch.float64
BATCH = 8


def _data(gen: torch.Generator) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=gen, dtype=DT))
    x = torch.randn(BATCH * STEPS, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (BATCH * STEPS,), generator=gen)
    return model, x, y


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, name: str, returns: str = "dict") -> None:
        super().__init__()
        self.net, self.name, self.returns = net, name, returns
        self.recorder: Recorder | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits} if self.returns == "dict" else loss

    def configure_optimizers(self):
        opt = OPTIMIZERS[self.name](self.parameters())
        self.recorder = Recorder(opt)
        return opt


def _fit(module: pl.LightningModule, x, y, callbacks, **kwargs) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=callbacks,
        precision="64-true",
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"logger": False, **kwargs},
    )
    trainer.fit(module, loader)


def _ce(model, batch):
    logits = model(batch[0])
    return F.cross_entropy(logits, batch[1]), logits


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_curvature_callback_trajectory_equals_closure_loop(gen, name):
    """Key correctness test: the Lightning run is the closure-contract run, step for step."""
    model, x, y = _data(gen)
    want = closure_trajectory(
        copy.deepcopy(model), name, list(zip(x.split(BATCH), y.split(BATCH))), _ce
    )
    module = Module(model, name, returns="loss" if name != "SophiaG" else "dict")
    cb = CurvatureCallback()
    _fit(module, x, y, [cb])
    rec = module.recorder
    assert rec.refreshes == REFRESH_STEPS
    assert rec.curvature_after_first > 0
    assert_same_trajectory(rec.params, want, atol=1e-12)
    assert "training_step" not in vars(module) and cb.optimizer is None  # undone at fit end


def test_without_callback_the_error_names_it(gen):
    from curvlab.errors import ClosureRequiredError

    model, x, y = _data(gen)
    with pytest.raises(ClosureRequiredError, match=r"lightning\.CurvatureCallback"):
        _fit(Module(model, "SophiaG"), x, y, [])


def test_monitor_callback_logs_through_the_trainer_logger(gen, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from tests.monitors.test_attach import StepNorm

    model, x, y = _data(gen)
    module = Module(model, "SophiaG")
    cb = MonitorCallback([StepNorm(model, every=2)])
    logger = CSVLogger(tmp_path, name="run", version=0)
    _fit(module, x, y, [CurvatureCallback(), cb], logger=logger, log_every_n_steps=1)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = {
            int(r["step"]): float(r["norm/value"]) for r in csv.DictReader(f) if r["norm/value"]
        }
    # checks after optimizer steps 2 and 4 = Lightning's (0-based) global steps 1 and 3; Lightning
    # repeats a logged value at later steps until it is logged again
    assert min(logged) == 1 and logged[1] != logged[3] > 0
    assert not cb.handle.attached
