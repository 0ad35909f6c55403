import pytest
import torch
from torch import nn

import dropsplit as ds
from dropsplit.core.sites import SiteContext, site_context
from dropsplit.models.lstm import LSTM, LSTMLayer

IMPLS = ["fused", "loop"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layers", [1, 3], ids=lambda n: f"layers={n}")
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_parity_with_nn_lstm_in_float64(impl, layers, with_state):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, num_layers=layers)
    ours = LSTM.from_torch(ref, implementation=impl)
    x = torch.randn(6, 4, 3)
    state = (torch.randn(layers, 4, 5), torch.randn(layers, 4, 5)) if with_state else None
    out_ref, (h_ref, c_ref) = ref(x, state)
    out, (h, c) = ours(x, state)
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    for i, site in enumerate(ours.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            ours_grad = getattr(site.module, name).grad
            assert torch.allclose(ours_grad, getattr(ref, f"{name}_l{i}").grad, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward(impl):
    torch.manual_seed(0)
    layer = LSTMLayer(3, 4, implementation=impl)
    x = torch.randn(5, 2, 3, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w: layer_out(layer, x, w), (x, layer.weight_hh.detach().clone().requires_grad_())
    )


def layer_out(layer, x, w):
    from torch.func import functional_call

    return functional_call(layer, {"weight_hh": w}, (x,))[0]


def test_implementations_agree_on_second_derivatives():
    torch.manual_seed(0)
    fused = LSTM(3, 4, 2, implementation="fused")
    loop = LSTM(3, 4, 2, implementation="loop")
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(5, 2, 3, requires_grad=True)
    results = []
    for model in (fused, loop):
        (g,) = torch.autograd.grad(model(x)[0].pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.pow(2).sum(), list(model.parameters())))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_functional_call_and_jacrev_with_the_loop():
    from torch.func import functional_call, jacrev

    torch.manual_seed(0)
    model = LSTM(2, 3, implementation="loop")
    x = torch.randn(4, 1, 2)
    params = dict(model.named_parameters())
    jac = jacrev(lambda p: functional_call(model, p, (x,))[0])(params)
    w = "layers.0.module.weight_hh"
    assert jac[w].shape == (4, 1, 3, 12, 3)
    eps = 1e-6
    d = torch.randn(12, 3)
    plus = {**params, w: params[w] + eps * d}
    minus = {**params, w: params[w] - eps * d}
    fd = (functional_call(model, plus, (x,))[0] - functional_call(model, minus, (x,))[0]) / (
        2 * eps
    )
    assert torch.allclose(torch.einsum("tbhij,ij->tbh", jac[w], d), fd, atol=1e-8)


def test_dropconnect_site_on_weight_hh():
    torch.manual_seed(0)
    model = LSTM(3, 4, 2, weight_dropout=0.5)
    assert len(ds.sites(model)) == 2
    x = torch.randn(5, 2, 3)
    model.eval()
    clean = model(x)[0]
    model.train()
    g = torch.Generator().manual_seed(0)
    with site_context(model, SiteContext("sample", [g])) as ctx:
        dropped = model(x)[0]
    assert not torch.allclose(clean, dropped)
    assert ctx.gates[0].shape == (16, 4)
    # replaying the recorded masks on a copy with masked weights gives the same output
    ref = LSTM(3, 4, 2)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for site, mask in zip(ref.layers, ctx.gates, strict=True):
            site.module.weight_hh.mul_(mask)
    assert torch.allclose(ref(x)[0], dropped)


def test_stacked_replica_weights_equal_separate_runs():
    torch.manual_seed(0)
    layer = LSTMLayer(3, 4, implementation="fused")
    x = torch.randn(5, 2, 3)
    w = torch.stack([layer.weight_hh * 0.5, layer.weight_hh * 2.0])
    from torch.func import functional_call

    stacked = functional_call(layer, {"weight_hh": w}, (torch.cat([x, x], 1),))[0]
    single = [functional_call(layer, {"weight_hh": wi}, (x,))[0] for wi in w]
    assert torch.allclose(stacked, torch.cat(single, 1), atol=1e-12)


def test_from_torch_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="batch_first"):
        LSTM.from_torch(nn.LSTM(2, 3, batch_first=True))
    with pytest.raises(ValueError, match="implementation"):
        LSTMLayer(2, 3, implementation="cudnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_on_cuda(impl):
    """cuDNN cannot double backward: the fused path switches it off while grads are recorded."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, 2).cuda()
    ours = LSTM.from_torch(ref, implementation=impl)
    x = torch.randn(5, 2, 3, device="cuda", requires_grad=True)
    out_ref = ref(x)[0]
    out = ours(x)[0]
    assert torch.allclose(out, out_ref, atol=1e-10)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_gate_context_is_live_only_inside_its_block():
    """The model learns of a live gate context from its own layers' attribute, not a global."""
    from dropsplit.models.awd import AWDLSTM

    model = AWDLSTM(5, 3, 4, 2, p_input=0.2, p_hidden=0.2, p_output=0.2, p_weight=0.2)
    layers = [m for m in model.modules() if isinstance(m, LSTMLayer)]

    def live():
        values = {layer.differentiated_twice for layer in layers}
        assert len(values) == 1
        return values.pop()

    assert layers and not live()
    with site_context(model, SiteContext("gate")):
        assert live()
        with site_context(model, SiteContext("off")):
            assert live()
    assert not live()
    with site_context(model, SiteContext("gate", twice=False)):
        assert not live()
    with pytest.raises(RuntimeError), site_context(model, SiteContext("gate")):
        raise RuntimeError("forward failed")
    assert not live()


@pytest.mark.parametrize("method", ["analytic-sampled", "analytic-implicit-only"])
def test_analytic_step_on_the_fused_lstm_equals_the_loop(method):
    """Under a live gate context the fused layer runs the loop: the gradients must not change."""
    from dropsplit.models.awd import AWDLSTM, lm_forward

    make = {
        "analytic-sampled": lambda: ds.Analytic("sampled", True, seed=4),
        "analytic-implicit-only": lambda: ds.Analytic(None, True, seed=4),
    }[method]
    grads = {}
    for implementation in ("fused", "loop"):
        torch.manual_seed(0)
        model = AWDLSTM(11, 4, 5, 2, implementation=implementation)
        tokens = torch.randint(0, 11, (6, 3), generator=torch.Generator().manual_seed(1))
        model.zero_grad(set_to_none=True)
        make().step(model, lm_forward, (tokens, tokens.roll(1, 0), model.init_state(3)))
        grads[implementation] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grads["fused"], grads["loop"])
