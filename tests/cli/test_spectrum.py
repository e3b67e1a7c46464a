from __future__ import annotations

import json

import pytest
import torch

from curvlab import HessianOperator
from curvlab.cli import build_parser, main
from curvlab.zoo import load_problem


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["spectrum", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("--problem", "--operator", "digits-mlp", "MODULE:FUNCTION", "examples:"):
        assert word in out


def test_spectrum_on_a_convex_problem_matches_the_dense_hessian(tmp_path, capsys):
    code = main(
        [
            "spectrum",
            "--problem",
            "breast-cancer-logreg",
            "--dtype",
            "float64",
            "--top-k",
            "3",
            "--tol",
            "1e-8",
            "--probes",
            "2",
            "--lanczos-steps",
            "31",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "top eigenvalues" in out and "per layer" in out
    assert (tmp_path / "spectrum.png").stat().st_size > 1000
    payload = json.loads((tmp_path / "spectrum.json").read_text())
    problem = load_problem("breast-cancer-logreg", dtype=torch.float64)
    exact = torch.linalg.eigvalsh(
        HessianOperator(problem.model, problem.loss_fn, problem.data).to_dense()
    )
    torch.testing.assert_close(
        torch.tensor(payload["top_eigenvalues"], dtype=torch.float64),
        exact.flip(0)[:3],
        rtol=1e-7,
        atol=0,
    )
    assert payload["bottom_eigenvalue"] >= -1e-10  # logistic regression: PSD Hessian
    assert abs(payload["trace"] - float(exact.sum())) < 5 * payload["trace_std_error"] + 1e-9
    assert payload["torch"] == torch.__version__
    assert sum(payload["matvecs"].values()) > 0


def test_user_model_and_unknown_problem(tmp_path, capsys):
    assert main(["spectrum", "--problem", "digits-mpl", "--out", str(tmp_path)]) == 2
    assert "did you mean 'digits-mlp'" in capsys.readouterr().err.lower()
    code = main(
        [
            "spectrum",
            "--model",
            "tests.cli.user_model:build",
            "--top-k",
            "2",
            "--trace-matvecs",
            "9",
            "--layer-matvecs",
            "4",
            "--probes",
            "1",
            "--lanczos-steps",
            "8",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "spectrum.json").read_text())["num_params"] == 4 * 3 + 3


def test_parser_lists_the_command():
    assert "spectrum" in build_parser().format_help()


@pytest.mark.parametrize("operator", ["ggn", "fisher"])
def test_the_per_layer_table_is_of_the_chosen_operator(operator):
    # a tanh MLP: its GGN differs from its Hessian, so a Hessian table would be caught.
    from torch import nn

    from curvlab import GGNOperator
    from curvlab.spectrum import summarize_spectrum

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    data, loss_fn = (X, y), nn.CrossEntropyLoss()
    summary, _, _ = summarize_spectrum(
        model,
        loss_fn,
        data,
        operator=operator,
        top_k=1,
        layer_matvecs=400,
        num_probes=1,
        lanczos_steps=8,
        generator=torch.Generator().manual_seed(1),
    )
    ggn = GGNOperator(model, loss_fn, data).to_dense()
    hess = HessianOperator(model, loss_fn, data).to_dense()
    offsets = [0, 24 + 6, 24 + 6 + 18 + 3]  # Linear(4, 6) then Linear(6, 3), weight and bias
    for row, lo, hi in zip(summary.layers, offsets, offsets[1:]):
        # the exact Fisher equals the GGN for cross-entropy; the MC Fisher is within its noise
        want = float(ggn[lo:hi, lo:hi].trace())
        other = float(hess[lo:hi, lo:hi].trace())
        slack = 5 * row["trace_std_error"] + (0.15 * abs(want) if operator == "fisher" else 0)
        assert abs(row["trace"] - want) <= slack + 1e-12
        assert row["trace"] >= 0  # a GGN/Fisher block is PSD
        if abs(other - want) > 0.1 * abs(want):  # the first layer (the last one's blocks agree)
            assert abs(row["trace"] - other) > abs(row["trace"] - want)
    first = float(hess[: offsets[1], : offsets[1]].trace())
    assert abs(first - float(ggn[: offsets[1], : offsets[1]].trace())) > 0.1 * abs(first)
