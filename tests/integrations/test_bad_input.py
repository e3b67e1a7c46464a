"""Bad input of the integrations: each a specific CurvlabError whose message says what to do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.errors import (
    ArgumentTypeError,
    ClosureRequiredError,
    CurvatureInputError,
    CurvatureNotSuppliedError,
    DoubleBackwardError,
)
from curvlab.integrations import attach_curvature
from curvlab.optim import AdaHessian, Sophia

X, Y = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 2)


class DictNet(nn.Module):
    """Returns a dict, with the fields named in ``keys`` (``"tuple"``: a tuple)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.lin, self.keys = nn.Linear(4, 3), keys

    def forward(self, x):
        logits = self.lin(x)
        out = {"loss": F.cross_entropy(logits, Y), "logits": logits, "hidden": logits}
        if self.keys == ("tuple",):
            return out["loss"], logits
        return {k: out[k] for k in self.keys}


def _hooked_forward(keys, estimator="gnb"):
    model = DictNet(keys)
    opt = Sophia(model.parameters(), estimator=estimator, seed=0)
    attach_curvature(model, opt)
    model(X)


def _attach_sgd():
    model = nn.Linear(4, 3)
    attach_curvature(model, torch.optim.SGD(model.parameters(), lr=0.1))


def _attach_not_a_module():
    attach_curvature(lambda x: x, Sophia([nn.Parameter(torch.zeros(2))]))


def _due_but_not_supplied():
    model = nn.Linear(4, 3)
    opt = AdaHessian(model.parameters(), seed=0)
    attach_curvature(model, opt)
    with torch.no_grad():  # no training forward pass: nothing estimated
        model(X)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()


def _sdpa_without_double_backward():
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    from tests.integrations._hf import batches, tiny_gpt2, token_data

    model = tiny_gpt2(attn="sdpa", dtype=torch.float32)
    opt = Sophia(model.parameters(), estimator="hutchinson", seed=0)
    out = model(**batches(token_data())[0])
    opt.estimate_curvature(out.loss, out.logits)


def _custom_estimator_without_retain_graph():
    def my_estimator(params, grads, outputs, generator):
        return [torch.ones_like(p) for p in params]

    my_estimator.create_graph = False
    model = nn.Linear(4, 3)
    opt = Sophia(model.parameters(), estimator=my_estimator, seed=0)
    logits = model(torch.randn(5, 4))
    opt.estimate_curvature(logits.sum(), logits)


def _closure_contract_without_closure():
    Sophia([nn.Parameter(torch.zeros(2))]).step()


CASES = [
    # (id, call, error, message fragment)
    ("gnb-output-without-logits", lambda: _hooked_forward(("loss",)), CurvatureInputError, "has no 'logits'"),
    ("hutchinson-output-without-loss", lambda: _hooked_forward(("logits",), "hutchinson"), CurvatureInputError, "'labels' entry"),
    ("tuple-output", lambda: _hooked_forward(("tuple",)), CurvatureInputError, "return a dict or a Hugging Face ModelOutput"),
    ("first-order-optimizer", _attach_sgd, ArgumentTypeError, "feeds the curvature of curvlab's Sophia or AdaHessian"),
    ("not-a-module", _attach_not_a_module, ArgumentTypeError, "needs the model"),
    ("due-but-not-supplied", _due_but_not_supplied, CurvatureNotSuppliedError, r"attach_curvature\(model, optimizer\) supplied no estimate"),
    ("sdpa-no-double-backward", _sdpa_without_double_backward, DoubleBackwardError, "attn_implementation='eager'"),
    ("framework-loop-without-set-up", _closure_contract_without_closure, ClosureRequiredError, r"transformers\.CurvatureCallback\(\)"),
    ("estimate-without-logits", lambda: Sophia(nn.Linear(4, 3).parameters()).estimate_curvature(None), CurvatureInputError, "pass the logits"),
    ("custom-estimator-without-retain-graph", _custom_estimator_without_retain_graph, CurvatureInputError, "must accept retain_graph=True"),
    ("external-source-not-a-string", lambda: Sophia(nn.Linear(4, 3).parameters()).expect_external_curvature(3), ArgumentTypeError, "a string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


def test_lightning_training_step_returning_only_the_loss_with_sophiag():
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is an optional dependency")
    from curvlab.integrations.lightning import CurvatureCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def training_step(self, batch, idx):
            return F.cross_entropy(self.lin(batch[0]), batch[1])

        def configure_optimizers(self):
            return Sophia(self.parameters(), seed=0)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=3)
    trainer = pl.Trainer(max_steps=1, callbacks=[CurvatureCallback()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with pytest.raises(CurvatureInputError, match=r'return \{"loss": loss, "logits": logits\}'):
        trainer.fit(Module(), loader)


def test_hf_trainer_batch_without_labels_with_sophiah(tmp_path):
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    from curvlab.integrations.transformers import CurvatureCallback
    from tests.integrations._hf import tiny_gpt2
    from tests.integrations.test_transformers import trainer_for

    model = tiny_gpt2()
    opt = Sophia(model.parameters(), estimator="hutchinson", seed=0)
    trainer = trainer_for(model, opt, tmp_path, [CurvatureCallback()])
    trainer.train_dataset = [{"input_ids": d["input_ids"]} for d in trainer.train_dataset]
    with pytest.raises(CurvatureInputError, match="'labels' entry"):
        trainer.train()


def test_hf_trainer_with_adam_and_the_curvature_callback(tmp_path):
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    from curvlab.integrations.transformers import CurvatureCallback
    from tests.integrations._hf import tiny_gpt2
    from tests.integrations.test_transformers import trainer_for

    model = tiny_gpt2()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ArgumentTypeError, match="the optimizer is Adam"):
        trainer_for(model, opt, tmp_path, [CurvatureCallback()]).train()


def test_monitors_lightning_callback_moved():
    import curvlab.monitors

    with pytest.raises(AttributeError, match=r"integrations\.lightning\.MonitorCallback"):
        curvlab.monitors.lightning_callback
