import pytest
import torch

import dropsplit as ds
from dropsplit.core.sites import SiteContext, site_context
from dropsplit.models.awd import AWDLSTM, lm_forward


def small_lm(implementation="loop", **kw):
    torch.manual_seed(0)
    return AWDLSTM(
        vocab_size=11,
        embedding_size=4,
        hidden_size=5,
        layers=3,
        implementation=implementation,
        **kw,
    )


def lm_batch(model, t=6, b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (t, b), generator=g)
    y = torch.randint(0, 11, (t, b), generator=g)
    return x, y, model.init_state(b)


def test_sites_and_names():
    model = small_lm(p_embedding=0.1)
    assert [n for n, _ in ds.named_sites(model)] == [
        "embedding",
        "input",
        "weight_hh.0",
        "weight_hh.1",
        "weight_hh.2",
        "hidden.0",
        "hidden.1",
        "output",
    ]


def test_tied_decoder_and_shapes():
    model = small_lm()
    assert model.decoder.weight is model.encoder.weight
    x, y, state = lm_batch(model)
    logits, new_state = model(x, state)
    assert logits.shape == (6, 3, 11)
    assert [s[0].shape for s in new_state] == [(1, 3, 5), (1, 3, 5), (1, 3, 4)]


@pytest.mark.parametrize(
    "method",
    [
        ds.NoDropout(),
        ds.DropoutK(2),
        ds.DropoutK(2, "difference"),
        ds.DropoutK(2, "analytic"),
        ds.DropoutK(2, implementation="batch", batch_dim=1),
        ds.Analytic(),
        ds.Analytic("label"),
    ],
    ids=["none", "dropout-2", "difference", "analytic-noise", "batch", "analytic", "label"],
)
def test_every_method_steps_on_the_lm(method):
    model = small_lm(p_embedding=0.1)
    model.zero_grad(set_to_none=True)
    result = method.step(model, lm_forward, lm_batch(model))
    assert result.finite
    assert all(p.grad is not None for p in model.parameters())
    assert not any(t.requires_grad for s in result.aux for t in s)


def test_embedding_row_dropout_is_a_site_of_the_explicit_term():
    model = small_lm(p_embedding=0.2)
    values = ds.explicit_regularizer(model, lm_forward, lm_batch(model), "exact", per_site=True)
    assert values["embedding"] > 0 and set(values) == {n for n, _ in ds.named_sites(model)}


@pytest.mark.parametrize("lstm", ["loop", "fused"])
def test_dropout_k_batch_duplication_equals_the_loop_on_the_lm(lstm):
    """Batch duplication: a [k, 4H, H] weight stack, one kernel call per replica when fused."""
    model = small_lm(lstm, p_embedding=0.2)
    batch = lm_batch(model)
    grads = {}
    for impl in ("loop", "batch"):
        model.zero_grad(set_to_none=True)
        ds.DropoutK(3, implementation=impl, batch_dim=1, seed=4).step(model, lm_forward, batch)
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["loop"], grads["batch"], strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_benchmark_reference_model_is_the_same_lm_on_nn_lstm():
    """The benchmark's nn.LSTM reference computes our model's logits (with dropout off)."""
    from dropsplit.experiments.reference_models import PlainAWD

    model = small_lm("fused")
    x, _, state = lm_batch(model)
    plain = PlainAWD(model, q=0.0)
    with site_context(model, SiteContext("off")):
        ours, _ = model(x, state)
    torch.testing.assert_close(plain(x), ours)
