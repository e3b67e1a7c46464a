"""attach(), the handle, failure isolation and the sinks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from curvlab.errors import EmptyDataError, LossNotScalarError, ParameterError, ShapeMismatchError
from curvlab.monitors import (
    CallbackSink,
    CSVSink,
    HistorySink,
    Monitor,
    MonitorWarning,
    TensorBoardSink,
    attach,
)


class StepNorm(Monitor):
    """Records the parameter norm; optionally fails on chosen calls."""

    def __init__(self, model, data=None, fail_on=(), every=1, name="norm", loss_fn=None):
        super().__init__(every=every, name=name)
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.fail_on = set(fail_on)
        self.calls = 0

    def compute(self, optimizer):
        self.calls += 1
        self.model.eval()  # a monitor that changes the mode must not leak it
        if self.calls in self.fail_on:
            raise RuntimeError("boom")
        norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in self.model.parameters()))
        return {"value": float(norm), "lr": optimizer.param_groups[0]["lr"]}


def _problem(gen):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    X = torch.randn(32, 4, generator=gen)
    y = torch.randn(32, 2, generator=gen)
    return model, X, y


def _train(model, opt, X, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()


def test_checks_every_n_steps_and_remove_stops(gen):
    model, X, y = _problem(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(opt, [StepNorm(model, every=3)], HistorySink())
    _train(model, opt, X, y, 10)
    assert handle.sink.steps("norm/value") == [3, 6, 9]
    assert handle.sink.values("norm/lr") == [0.1, 0.1, 0.1]
    handle.remove()
    assert not handle.attached
    _train(model, opt, X, y, 5)
    assert handle.sink.steps("norm/value") == [3, 6, 9]
    assert len(opt._optimizer_step_post_hooks) == 0
    handle.remove()  # idempotent


def test_context_manager_and_check_now(gen):
    model, _, _ = _problem(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(opt, StepNorm(model, every=100)) as handle:
        values = handle.check_now()
        assert set(values) == {"norm/value", "norm/lr"}
        assert handle.sink.steps("norm/value") == [0]
    assert not handle.attached


def test_failing_monitor_never_corrupts_training(gen):
    model, X, y = _problem(gen)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    model.train()
    monitor = StepNorm(model, fail_on={2, 3})
    handle = attach(opt, [monitor], HistorySink())
    with pytest.warns(MonitorWarning, match="failed at step 2") as record:
        _train(model, opt, X, y, 5)
    assert sum(issubclass(w.category, MonitorWarning) for w in record) == 1  # warned once
    _train(ref, ref_opt, X, y, 5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert model.training  # mode restored even though the monitor set eval() and raised
    assert [(f.step, f.monitor) for f in handle.failures] == [(2, "norm"), (3, "norm")]
    assert "boom" in handle.failures[0].error
    assert handle.sink.steps("norm/failed") == [2, 3]
    assert handle.sink.steps("norm/value") == [1, 4, 5]
    assert handle.checks["norm"] == 5 and handle.seconds["norm"] >= 0.0


def test_failing_sink_never_breaks_training(gen):
    model, X, y = _problem(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def bad(step, values):
        raise OSError("disk full")

    handle = attach(opt, [StepNorm(model)], CallbackSink(bad))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(model, opt, X, y, 3)
    assert sum(issubclass(w.category, MonitorWarning) for w in record) == 1
    assert [f.monitor for f in handle.failures] == ["<sink>"] * 3


def test_bad_input_raises_at_attach(gen):
    model, X, y = _problem(gen)
    other = nn.Linear(4, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ParameterError, match="optimizer does not update"):
        attach(opt, [StepNorm(model)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mse = nn.functional.mse_loss
    with pytest.raises(ShapeMismatchError, match="does not fit the model"):
        attach(opt, [StepNorm(model, data=(torch.randn(8, 5), torch.randn(8, 2)), loss_fn=mse)])
    with pytest.raises(ShapeMismatchError, match="8 inputs but 7 targets"):
        attach(opt, [StepNorm(model, data=(torch.randn(8, 4), torch.randn(7, 2)), loss_fn=mse)])
    with pytest.raises(ShapeMismatchError, match="pair"):
        attach(opt, [StepNorm(model, data=torch.randn(8, 4), loss_fn=mse)])
    with pytest.raises(EmptyDataError, match="no example"):
        attach(opt, [StepNorm(model, data=(torch.randn(0, 4), torch.randn(0, 2)), loss_fn=mse)])
    per_example = nn.MSELoss(reduction="none")
    with pytest.raises(LossNotScalarError, match="scalar"):
        attach(opt, [StepNorm(model, data=(X, y), loss_fn=per_example)])
    with pytest.raises(ValueError, match="unique"):
        attach(opt, [StepNorm(model), StepNorm(model)])
    with pytest.raises(ValueError, match="write"):
        attach(opt, [StepNorm(model)], sink=object())
    with pytest.raises(ValueError, match="at least one"):
        attach(opt, [])
    with pytest.raises(ValueError, match="every"):
        StepNorm(model, every=0)
    with pytest.raises(TypeError, match="Optimizer"):
        attach("sgd", [StepNorm(model)])  # type: ignore[arg-type]
    assert len(opt._optimizer_step_post_hooks) == 0  # nothing was hooked by the failed attaches


def test_csv_sink_round_trip(tmp_path, gen):
    model, X, y = _problem(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CSVSink(tmp_path / "sub" / "m.csv")
    handle = attach(opt, [StepNorm(model, every=2), StepNorm(model, every=3, name="b")], sink)
    _train(model, opt, X, y, 6)
    handle.remove()
    sink.close()
    rows = CSVSink.read(tmp_path / "sub" / "m.csv")
    assert [s for s, _ in rows["norm/value"]] == [2, 4, 6]
    assert [s for s, _ in rows["b/value"]] == [3, 6]
    assert rows["norm/value"][-1][1] == rows["b/value"][-1][1]  # full float precision kept
    again = CSVSink(tmp_path / "sub" / "m.csv", append=True)
    again.write(7, {"x": 1.5})
    again.close()
    assert CSVSink.read(tmp_path / "sub" / "m.csv")["x"] == [(7, 1.5)]
    assert (tmp_path / "sub" / "m.csv").read_text().count("step,name,value") == 1


def test_callback_sink_prefix_and_type_check():
    seen = []
    sink = CallbackSink(lambda s, v: seen.append((s, v)), prefix="run1/")
    sink.write(4, {"a/b": 2})
    assert seen == [(4, {"run1/a/b": 2.0})]
    with pytest.raises(TypeError, match="callable"):
        CallbackSink(3)  # type: ignore[arg-type]


def test_history_sink_last_and_names():
    sink = HistorySink()
    assert sink.last("x") != sink.last("x")  # NaN when absent
    sink.write(1, {"x": 1.0, "y": 2.0})
    sink.write(2, {"x": 3.0})
    assert sink.last("x") == 3.0 and sink.names() == ["x", "y"]


def test_tensorboard_sink(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    sink = TensorBoardSink(tmp_path)
    sink.write(1, {"a/b": 1.0})
    sink.close()
    assert any(tmp_path.iterdir())


def test_store_sink_records_checks_in_the_benchmark_store(tmp_path):
    """Monitor values land in the benchmark store's monitors table and survive reopening."""
    import torch
    from torch import nn

    from curvlab.bench import Store, StoreSink
    from curvlab.monitors import CurvatureLR, attach

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "store.sqlite"
    sink = StoreSink(path, key="run-a")
    handle = attach(opt, CurvatureLR(model, nn.MSELoss(), (x, y), every=2), sink)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    handle.remove()
    sink.close()
    store = Store(path)
    rows = store.monitor_values("run-a")
    assert {r["step"] for r in rows} == {2, 4}
    assert all(r["name"].startswith("curvature_lr/") for r in rows)
    assert store.integrity_check() == "ok"
    store.close()


def test_store_sink_moved_to_bench():
    import curvlab.monitors

    with pytest.raises(AttributeError, match=r"moved to curvlab\.bench\.StoreSink"):
        curvlab.monitors.StoreSink
    assert "StoreSink" not in curvlab.monitors.__all__
