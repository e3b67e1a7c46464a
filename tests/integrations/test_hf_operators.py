"""Curvature operators on tiny random-init Hugging Face models (no download), against dense float64
oracles built independently with ``torch.func`` on the *eager*-attention twin of the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab as cl
from curvlab.errors import ShapeMismatchError
from curvlab.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    shift_labels,
    shift_logits,
)

transformers = pytest.importorskip("transformers")

VOCAB = 16
ATTENTION = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"]


def gpt2(attn: str) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=VOCAB, n_positions=8, bos_token_id=0,
        eos_token_id=0, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    assert model.config._attn_implementation == attn
    return model


def llama(attn: str) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


def lm_data() -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """Two dict batches (3 and 2 sequences, right-padded, padding labelled -100) and their union."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (5, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    full = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    batches = [{k: v[:3] for k, v in full.items()}, {k: v[3:] for k, v in full.items()}]
    return batches, full


def functional(model: nn.Module, names: list[str], batch: dict[str, Tensor]):
    """The model's logits on ``batch`` as a function of the flat chosen parameters."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    params = dict(model.named_parameters())
    state = {**{n: p.detach() for n, p in params.items()}, **dict(model.named_buffers())}
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def logits(theta: Tensor) -> Tensor:
        chunks = theta.split(sizes)
        state.update({n: c.view_as(params[n]) for n, c in zip(names, chunks)})
        return functional_call(model, state, (), inputs, tie_weights=True).logits

    return logits, flat


def close(got: Tensor, want: Tensor, tol: float = 1e-10) -> float:
    err = float((got - want).norm() / want.norm())
    assert err < tol, err
    return err


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_hessian_over_dict_batches_equals_the_eager_dense_oracle(attn):
    batches, full = lm_data()
    oracle_model = gpt2("eager")
    logits, flat = functional(oracle_model, ATTENTION, full)
    labels = shift_labels(full["labels"])
    want = jacrev(grad(lambda t: F.cross_entropy(shift_logits(logits(t)), labels)))(flat)
    H = HessianOperator(
        gpt2(attn), nn.CrossEntropyLoss(), batches, params=ATTENTION,
        output_fn=shift_logits, target_fn=shift_labels,
    )  # fmt: skip
    close(H.to_dense(), want)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vectorized = HessianOperator(
        gpt2(attn), nn.CrossEntropyLoss(), full, params=ATTENTION, vectorize=True,
        output_fn=shift_logits, target_fn=shift_labels,
    )  # fmt: skip
    close(vectorized @ V, want @ V)


def test_gpt2_ggn_fisher_and_empirical_fisher_on_per_token_logits_equal_dense_oracles():
    batches, full = lm_data()
    per_token = lambda out: out.logits.transpose(1, 2)  # noqa: E731  [B, C, T] for CE
    logits, flat = functional(gpt2("eager"), ATTENTION, full)
    y = full["labels"]
    counted = int((y != -100).sum())
    J = jacrev(lambda t: per_token(SimpleOut(logits(t))))(flat)  # [B, C, T, P]
    out = per_token(SimpleOut(logits(flat)))
    H_out = jacrev(grad(lambda o: F.cross_entropy(o, y)))(out)  # [B, C, T, B, C, T]
    n_out = out.numel()
    Jm = J.reshape(n_out, -1)
    ggn = Jm.T @ H_out.reshape(n_out, n_out) @ Jm
    per_example = jacrev(
        lambda t: F.cross_entropy(per_token(SimpleOut(logits(t))), y, reduction="none").sum(1)
    )(flat)
    ef = per_example.T @ per_example / counted
    model = gpt2("sdpa")
    kw = {"params": ATTENTION, "output_fn": per_token}
    close(GGNOperator(model, nn.CrossEntropyLoss(), batches, **kw).to_dense(), ggn)
    close(EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), batches, **kw).to_dense(), ef)
    fisher = FisherOperator(model, nn.CrossEntropyLoss(), full, mc_samples=3, **kw)
    got = fisher.to_dense()
    S = fisher._cache[0].extra  # the sampled output gradients [M, B, C, T]
    assert bool((S.movedim(2, -1)[:, y == -100] == 0).all())  # ignored tokens draw nothing
    G = torch.einsum("bctp,mbct->mbp", J, S)
    close(got, torch.einsum("mbp,mbq->pq", G, G) / (3 * counted))


class SimpleOut:
    """What the oracle hands ``output_fn``: an object with ``logits``, like a ``ModelOutput``."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits


def test_llama_flattened_logits_hessian_equals_the_dense_oracle():
    # Llama's eager attention takes its softmax in float32 even in a float64 model (5e-8 apart
    # from SDPA), so the oracle is the SDPA model itself, differentiated by torch.func on the
    # math kernel; RMSNorm also rounds to float32, which leaves ~3e-11 between the two
    batches, full = lm_data()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    logits, flat = functional(llama("sdpa"), names, full)
    rows = lambda out: out.logits.flatten(0, 1)  # noqa: E731  [B T, C]
    labels = full["labels"].flatten()
    with sdpa_kernel(SDPBackend.MATH):
        want = jacrev(grad(lambda t: F.cross_entropy(logits(t).flatten(0, 1), labels)))(flat)
    H = HessianOperator(
        llama("sdpa"), nn.CrossEntropyLoss(), batches, params=names, output_fn=rows,
        target_fn=lambda y: y.flatten(),
    )  # fmt: skip
    close(H.to_dense(), want)


def test_eigsh_and_trace_run_on_gpt2_dict_batches():
    batches, full = lm_data()
    logits, flat = functional(gpt2("eager"), ATTENTION, full)
    labels = shift_labels(full["labels"])
    dense = jacrev(grad(lambda t: F.cross_entropy(shift_logits(logits(t)), labels)))(flat)
    H = HessianOperator(
        gpt2("sdpa"), nn.CrossEntropyLoss(), batches, params=ATTENTION,
        output_fn=shift_logits, target_fn=shift_labels,
    )  # fmt: skip
    top = cl.eigsh(H, k=1, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert abs(float(top.values[0]) / float(torch.linalg.eigvalsh(dense)[-1]) - 1) < 1e-8
    est = cl.trace(H, num_matvecs=30, generator=torch.Generator().manual_seed(0))
    assert abs(float(est.value - dense.trace())) < 5 * float(est.std_error) + 1e-9
    whole = HessianOperator(
        gpt2("sdpa").float(), nn.CrossEntropyLoss(), batches, output_fn=shift_logits,
        target_fn=shift_labels,
    )  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = cl.eigsh(whole, k=1, tol=1e-2, generator=torch.Generator().manual_seed(0))
    assert value.values.dtype == torch.float32 and bool(torch.isfinite(value.values).all())


def test_a_causal_lm_output_the_loss_cannot_take_names_output_fn():
    _, full = lm_data()
    with pytest.raises(ShapeMismatchError, match="output_fn="):  # [B, T, C] logits, [B, T] labels
        HessianOperator(gpt2("sdpa"), nn.CrossEntropyLoss(), full)
