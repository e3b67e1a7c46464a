"""Hugging Face Trainer: Sophia (G, H) and AdaHessian with CurvatureCallback; monitors reported."""

from __future__ import annotations

import copy
import warnings

import pytest

from curvlab.errors import ZeroCurvatureWarning
from curvlab.optim import Sophia
from tests.integrations._common import (
    OPTIMIZERS,
    REFRESH_STEPS,
    STEPS,
    Recorder,
    assert_same_trajectory,
    closure_trajectory,
)
from tests.integrations._hf import BATCH, batches, lm_forward, tiny_gpt2, token_data

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency")
from curvlab.integrations.transformers import (  # noqa: E402
    CurvatureCallback,
    MonitorCallback,
    add_callback,
)


def trainer_for(model, opt, tmp_path, callbacks=(), **kwargs):
    """A Trainer that steps exactly like the reference loop: sequential batches, constant lr,
    no clipping, no decay of its own."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to=kwargs.pop("report_to", "none"),
        save_strategy="no",
        logging_steps=kwargs.pop("logging_steps", 500),
        disable_tqdm=True,
        **kwargs,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=token_data(),
        optimizers=(opt, None),
        callbacks=list(callbacks),
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_curvature_callback_trajectory_equals_closure_loop(tmp_path, name):
    """Key correctness test: the Trainer's run is the closure-contract run, step for step."""
    model = tiny_gpt2()
    want = closure_trajectory(copy.deepcopy(model), name, batches(token_data()), lm_forward)
    opt = OPTIMIZERS[name](model.parameters())
    rec = Recorder(opt)
    cb = CurvatureCallback()
    trainer_for(model, opt, tmp_path, [cb]).train()
    assert rec.refreshes == REFRESH_STEPS
    assert rec.curvature_after_first > 0
    assert_same_trajectory(rec.params, want, atol=1e-12)
    assert cb.handle is None and opt.curvature_source is None  # undone at train end


def test_sophia_without_update_period_warns_once_in_the_trainer(tmp_path):
    model = tiny_gpt2()
    opt = Sophia(model.parameters(), lr=0.01, update_period=None, seed=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer_for(model, opt, tmp_path).train()
    zero = [w for w in seen if issubclass(w.category, ZeroCurvatureWarning)]
    assert len(zero) == 1 and "update_curvature" in str(zero[0].message)


def test_monitor_callback_values_reach_a_tensorboard_reporter(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.monitors.test_attach import StepNorm

    model = tiny_gpt2()
    opt = OPTIMIZERS["SophiaG"](model.parameters())
    trainer = trainer_for(
        model, opt, tmp_path, [CurvatureCallback()], report_to="tensorboard", logging_steps=1
    )
    cb = MonitorCallback([StepNorm(model, every=2)])
    add_callback(trainer, cb)
    trainer.train()
    assert all("norm/value" in row for row in trainer.state.log_history if row["step"] in (2, 4))
    runs = [p.parent for p in tmp_path.rglob("events.out.tfevents*")]
    acc = EventAccumulator(str(runs[0])).Reload()
    tags = acc.Tags()["scalars"]
    tag = next(t for t in tags if t.endswith("norm/value"))
    assert [e.step for e in acc.Scalars(tag)] == [2, 4]
    assert not cb.handle.attached
