"""The Transformer LM: causal, its attention against torch's, double backward, its sites."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_transformer
from torch import nn

import dropsplit as ds
from dropsplit.core.sites import SiteContext, site_context
from dropsplit.models import TransformerLM
from dropsplit.models.awd import lm_forward
from dropsplit.models.transformer import Block, CausalSelfAttention

SITES = [
    "input",
    "attention.0",
    "attn_out.0",
    "mlp_hidden.0",
    "mlp_out.0",
    "attention.1",
    "attn_out.1",
    "mlp_hidden.1",
    "mlp_out.1",
    "output",
]


def two_blocks(**kwargs):
    torch.manual_seed(0)
    p = dict(p_input=0.1, p_attention=0.1, p_attn_out=0.1, p_mlp_hidden=0.1, p_mlp_out=0.1)
    return TransformerLM(7, 8, 2, 2, 16, p_output=0.1, **{**p, **kwargs})


def test_site_names_in_forward_order():
    assert [name for name, _ in ds.named_sites(two_blocks())] == SITES
    recorded = []
    model = two_blocks()
    with site_context(model, SiteContext("gate")) as ctx:
        model(torch.randint(0, 7, (5, 2)))
    names = ds.core.sites.site_names(model)
    recorded = [names[s] for s, _ in ctx.record]
    assert recorded == SITES
    assert ctx.record[1][1].shape == (2, 2, 5, 5)  # heads, B, T, T: probabilities gated


@pytest.mark.parametrize("training", [True, False])
def test_causal(training):
    """Changing a future token changes no earlier logit (in eval, and in training with one mask)."""
    model = two_blocks()
    model.train(training)
    tokens = torch.randint(0, 7, (6, 3))
    changed = tokens.clone()
    changed[4] = (changed[4] + 1) % 7
    gen = [torch.Generator().manual_seed(0)]
    with site_context(model, SiteContext("sample", gen)):
        a, _ = model(tokens)
    gen = [torch.Generator().manual_seed(0)]
    with site_context(model, SiteContext("sample", gen)):
        b, _ = model(changed)
    torch.testing.assert_close(a[:4], b[:4], rtol=0, atol=0)
    assert not torch.allclose(a[4], b[4])


def test_explicit_attention_equals_sdpa_with_a_causal_mask():
    torch.manual_seed(1)
    attention = CausalSelfAttention(8, 2, 0.3, 0.0, 0).eval()  # site off in eval
    x = torch.randn(5, 3, 8)
    fast = attention(x)
    q, k, v = attention.qkv(x).view(5, 3, 3, 2, 4).unbind(2)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    reference = attention.proj(reference.permute(2, 0, 1, 3).reshape(5, 3, 8))
    torch.testing.assert_close(fast, reference)
    attention.differentiated_twice = True  # forces the explicit softmax path
    torch.testing.assert_close(attention(x), reference)


def test_gradgradcheck_through_a_block():
    torch.manual_seed(2)
    block = Block(4, 2, 6, 0.2, 0.2, 0.2, 0.2, 0)
    x = torch.randn(3, 2, 4, requires_grad=True)
    gates = [
        torch.ones(s, requires_grad=True) for s in ((2, 2, 3, 3), (3, 2, 4), (3, 2, 6), (3, 2, 4))
    ]

    def run(x, *gates):
        with site_context(block, SiteContext("fixed", multipliers=list(gates))):
            return block(x)

    assert torch.autograd.gradgradcheck(run, (x, *gates))


def test_double_backward_never_reaches_the_fused_kernel():
    """A method that double-backwards through a model whose attention site is off still works."""
    model = two_blocks(p_attention=0.0)
    batch = (torch.randint(0, 7, (5, 2)), torch.randint(0, 7, (5, 2)), None)
    model.zero_grad(set_to_none=True)
    ds.Analytic("exact", True, seed=0).step(model, lm_forward, batch)
    model.zero_grad(set_to_none=True)
    ds.DropoutK(2, "analytic", seed=0).step(model, lm_forward, batch)


def test_window_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="context"):
        two_blocks()(torch.randint(0, 7, (17, 2)))
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerLM(7, 6, 1, 4)


def test_tied_decoder():
    model = two_blocks()
    assert model.decoder.weight is model.token_embedding.weight
    assert TransformerLM(7, 8, 1, 2, tie_weights=False).decoder.weight.shape == (7, 8)


def test_convert_takes_over_modules_and_names_the_attention_it_cannot():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1)
    with pytest.warns(UserWarning, match=r"layers.0.self_attn \(dropout=0.1\)"):
        model = ds.convert(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), batch_dim=1)
    names = [name for name, _ in ds.named_sites(model)]
    assert names == [f"layers.{i}.dropout{s}" for i in (0, 1) for s in ("", "1", "2")]
    assert all(s.batch_dim == 1 for s in ds.sites(model))
    lstm = nn.Module()
    lstm.rnn = nn.LSTM(3, 4, num_layers=2, dropout=0.2)
    with pytest.warns(UserWarning, match=r"rnn \(dropout=0.2\)"):
        ds.convert(lstm)


def test_sited_transformer_from_the_readme_needs_no_warning(recwarn):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1)
    layer.self_attn.dropout = 0.0
    ds.convert(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    assert not [w for w in recwarn if "could not take over" in str(w.message)]


def test_tiny_problem_has_every_site():
    names = [name for name, _ in ds.named_sites(tiny_transformer())]
    assert names == ["input", "attention.0", "attn_out.0", "mlp_hidden.0", "mlp_out.0", "output"]
