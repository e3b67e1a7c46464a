"""TensorBoardSink: its own writer, or the user's (never closed by the sink)."""

from __future__ import annotations

import pytest

from curvlab.errors import ArgumentTypeError, InvalidArgumentError
from curvlab.monitors import TensorBoardSink


def _scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir)).Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_sink_writes_to_an_existing_writer_and_leaves_it_open(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    sink = TensorBoardSink(writer=writer)
    sink.write(2, {"sharpness/value": 1.5})
    sink.close()
    writer.add_scalar("train/loss", 0.5, 3)  # still open: the sink did not close it
    writer.close()
    assert _scalars(tmp_path, "sharpness/value") == [(2, 1.5)]
    assert _scalars(tmp_path, "train/loss") == [(3, 0.5)]


def test_tensorboard_sink_closes_the_writer_it_opened(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    sink = TensorBoardSink(tmp_path)
    sink.write(1, {"a/b": 2.0})
    sink.close()
    assert _scalars(tmp_path, "a/b") == [(1, 2.0)]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({}, InvalidArgumentError, "exactly one"),
        ({"log_dir": "x", "writer": object()}, InvalidArgumentError, "exactly one"),
        ({"writer": object()}, ArgumentTypeError, "add_scalar"),
    ],
)
def test_tensorboard_sink_bad_input(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        TensorBoardSink(**kwargs)
