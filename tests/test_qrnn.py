"""The QRNN: forget-mult loop against scan, a layer against its equations, double backward."""

import pytest
import torch
from conftest import tiny_qrnn

import dropsplit as ds
from dropsplit.models import QRNN, QRNNLayer
from dropsplit.models.awd import lm_forward
from dropsplit.models.qrnn import forget_mult_loop, forget_mult_scan


@pytest.mark.parametrize("steps", [1, 2, 5, 8, 13], ids=lambda t: f"T={t}")
def test_loop_and_scan_forget_mult_agree(steps):
    torch.manual_seed(steps)
    f = torch.rand(steps, 3, 4, requires_grad=True)
    z = (3 * torch.randn(steps, 3, 4)).requires_grad_()  # negative values too
    c0 = torch.randn(3, 4, requires_grad=True)
    loop, scan = forget_mult_loop(f, z, c0), forget_mult_scan(f, z, c0)
    torch.testing.assert_close(scan, loop, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(loop)
    for a, b in zip(
        torch.autograd.grad((loop * weights).sum(), (f, z, c0)),
        torch.autograd.grad((scan * weights).sum(), (f, z, c0)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("forget_mult", ["loop", "scan"])
def test_window_2_layer_matches_the_equations(forget_mult):
    """Z, F, O from [x_{t-1}, x_t] (x_0's predecessor from the state), c and h step by step."""
    torch.manual_seed(0)
    layer = QRNNLayer(3, 4, window=2, forget_mult=forget_mult)
    x, c_prev, x_prev = torch.randn(5, 2, 3), torch.randn(1, 2, 4), torch.randn(1, 2, 3)
    out, (c_last, x_last) = layer(x, (c_prev, x_prev))
    w, b = layer.weight, layer.bias
    c, previous, expected = c_prev[0], x_prev[0], []
    for t in range(5):
        gates = torch.cat([previous, x[t]], -1) @ w.T + b
        z, f, o = (
            torch.tanh(gates[:, :4]),
            torch.sigmoid(gates[:, 4:8]),
            torch.sigmoid(gates[:, 8:]),
        )
        c = f * z + (1 - f) * c
        expected.append(o * c)
        previous = x[t]
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_last[0], c)
    torch.testing.assert_close(x_last, x[-1:])


@pytest.mark.parametrize("window", [1, 2])
def test_windows_carry_across_bptt_chunks(window):
    """Two chunks with the carried state equal one run over the whole sequence."""
    torch.manual_seed(1)
    layer = QRNNLayer(3, 4, window=window)
    x = torch.randn(7, 2, 3)
    whole, _ = layer(x)
    first, state = layer(x[:3])
    second, _ = layer(x[3:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)


@pytest.mark.parametrize("forget_mult", ["loop", "scan"])
@pytest.mark.parametrize("window", [1, 2])
def test_gradgradcheck(window, forget_mult):
    torch.manual_seed(2)
    layer = QRNNLayer(2, 3, window=window, forget_mult=forget_mult)
    x = torch.randn(4, 2, 2, requires_grad=True)

    def run(x, weight):
        return torch.func.functional_call(layer, {"weight": weight}, (x,))[0]

    weight = layer.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(run, (x, weight))


def test_torch_func_jacobian_of_both_forget_mults_agree():
    torch.manual_seed(3)
    layers = {m: QRNNLayer(2, 3, window=2, forget_mult=m) for m in ("loop", "scan")}
    layers["scan"].load_state_dict(layers["loop"].state_dict())
    x = torch.randn(5, 2, 2)
    jac = {
        m: torch.func.jacrev(
            lambda w, layer=layer: torch.func.functional_call(layer, {"weight": w}, (x,))[0]
        )(layer.weight.detach())
        for m, layer in layers.items()
    }
    torch.testing.assert_close(jac["scan"], jac["loop"], rtol=1e-10, atol=1e-12)


def test_stacked_replica_weights_equal_separate_runs():
    torch.manual_seed(4)
    layer = QRNNLayer(3, 4, window=2)
    x = torch.randn(5, 4, 3)
    stack = torch.randn(2, *layer.weight.shape)
    both = torch.func.functional_call(layer, {"weight": stack}, (x,))[0]
    for r in range(2):
        alone = torch.func.functional_call(layer, {"weight": stack[r]}, (x[:, 2 * r : 2 * r + 2],))
        torch.testing.assert_close(both[:, 2 * r : 2 * r + 2], alone[0])


def test_sites_of_the_qrnn_lm():
    names = [name for name, _ in ds.named_sites(tiny_qrnn())]
    assert names == ["embedding", "input", "weight.0", "weight.1", "hidden.0", "output"]
    windows = [site.module.window for site in tiny_qrnn().rnns]
    assert windows == [2, 1]


def test_multilayer_qrnn_module():
    torch.manual_seed(5)
    qrnn = QRNN(3, 4, num_layers=2, weight_dropout=0.3)
    out, state = qrnn(torch.randn(6, 2, 3))
    assert out.shape == (6, 2, 4) and len(state) == 2
    assert [s.label for s in ds.sites(qrnn)] == ["weight.0", "weight.1"]
    with pytest.raises(ValueError, match="window"):
        QRNNLayer(3, 4, window=3)
    with pytest.raises(ValueError, match="forget_mult"):
        QRNNLayer(3, 4, forget_mult="cuda")


def test_lm_forget_mults_give_the_same_step():
    torch.manual_seed(6)
    loop, scan = tiny_qrnn(forget_mult="loop"), tiny_qrnn(forget_mult="scan")
    scan.load_state_dict(loop.state_dict())
    batch = (torch.randint(0, 5, (6, 3)), torch.randint(0, 5, (6, 3)), None)
    for model in (loop, scan):
        model.zero_grad(set_to_none=True)
        ds.Analytic("exact", True, seed=1).step(model, lm_forward, batch)
    for a, b in zip(loop.parameters(), scan.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
