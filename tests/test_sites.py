import pytest
import torch
from torch import nn

import dropsplit as ds
from dropsplit.core.sites import SiteContext, site_context


def test_dropout_matches_nn_dropout_in_distribution():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    ours = ds.Dropout(0.3)(x)
    theirs = nn.Dropout(0.3)(x)
    for out in (ours, theirs):
        assert sorted(out.unique().tolist()) == pytest.approx([0.0, 1 / 0.7])
    assert (ours == 0).double().mean().item() == pytest.approx(0.3, abs=0.005)
    assert ours.mean().item() == pytest.approx(1.0, abs=0.01)


def test_eval_mode_is_identity():
    site = ds.Dropout(0.5).eval()
    x = torch.randn(4, 5)
    assert site(x) is x
    dc = ds.DropConnect(nn.Linear(3, 2), "weight", 0.5).eval()
    z = torch.randn(4, 3)
    assert torch.equal(dc(z), dc.module(z))


def test_locked_mask_is_constant_over_time():
    site = ds.Dropout(0.5, shared_dims=(0,), batch_dim=1)
    out = site(torch.ones(7, 3, 5))
    assert torch.equal(out, out[:1].expand_as(out))
    assert (out == 0).any()


def test_channel_dropout_shares_over_space():
    site = ds.Dropout(0.5, shared_dims=(2, 3))
    out = site(torch.ones(4, 6, 3, 3))
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))


def test_generator_makes_masks_reproducible():
    a = ds.Dropout(0.5, generator=torch.Generator().manual_seed(3))(torch.ones(50))
    b = ds.Dropout(0.5, generator=torch.Generator().manual_seed(3))(torch.ones(50))
    assert torch.equal(a, b)


def test_dropconnect_mask_is_shared_by_the_batch_and_weights_still_train():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    dc = ds.DropConnect(lin, "weight", 0.5)
    x = torch.eye(3).repeat(4, 1)  # every row reads one column of the weight
    y = dc(x)
    assert torch.equal(y[:3], y[3:6])  # the same masked weight for the whole batch
    y.sum().backward()
    assert lin.weight.grad is not None
    assert list(dict(dc.named_parameters())) == ["module.weight"]


def test_embedding_row_dropout():
    emb = nn.Embedding(10, 4)
    site = ds.DropConnect(emb, "weight", 0.5, shared_dims=(1,))
    torch.manual_seed(1)
    out = site(torch.arange(10))
    dropped = (out == 0).all(dim=1)
    assert dropped.any() and ((out != 0).all(dim=1) | dropped).all()


def test_convert_replaces_dropout_modules_and_keeps_p():
    model = nn.Sequential(
        nn.Linear(2, 2), nn.Dropout(0.1), nn.Sequential(nn.Dropout2d(0.2)), nn.Dropout1d(0.3)
    )
    ds.convert(model)
    found = ds.named_sites(model)
    assert [n for n, _ in found] == ["1", "2.0", "3"]
    assert [s.p for _, s in found] == [0.1, 0.2, 0.3]
    assert [s.shared_dims for _, s in found] == [(), (-2, -1), (-1,)]
    assert isinstance(ds.convert(nn.Dropout(0.5)), ds.Dropout)


def test_site_labels_and_order():
    from dropsplit.models.toy import TinyRNNLM

    assert [n for n, _ in ds.named_sites(TinyRNNLM())] == ["input", "weight_hh", "output"]


def test_duplicate_site_names_are_rejected():
    model = nn.Sequential(ds.Dropout(0.1, label="a"), ds.Dropout(0.1, label="a"))
    with pytest.raises(ValueError, match="unique"):
        ds.sites(model)


def test_gate_mode_records_one_gate_per_mask_group():
    site = ds.Dropout(0.5, shared_dims=(0,), batch_dim=1)
    model = nn.Sequential(site)
    for grouping, shape in (("mask", (1, 3, 4)), ("element", (5, 3, 4))):
        with site_context(model, SiteContext("gate", grouping=grouping)) as ctx:
            model(torch.randn(5, 3, 4))
        assert ctx.gates[0].shape == shape and ctx.gates[0].requires_grad


def test_batch_replicas_draw_the_loop_masks():
    site = ds.Dropout(0.5, shared_dims=(0,), batch_dim=1)
    model = nn.Sequential(site)
    x = torch.ones(4, 2, 3)
    loop = []
    for seed in (1, 2):
        with site_context(model, SiteContext("sample", [torch.Generator().manual_seed(seed)])):
            loop.append(model(x))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with site_context(model, SiteContext("sample", gens)):
        batched = model(torch.cat([x, x], dim=1))
    assert torch.equal(batched, torch.cat(loop, dim=1))


def test_weight_replicas_need_a_module_that_accepts_them():
    model = ds.DropConnect(nn.Linear(3, 2), "weight", 0.5)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with pytest.raises(ValueError, match="batched_weights=True"):
        with site_context(model, SiteContext("sample", gens)):
            model(torch.randn(4, 3))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ds.Dropout(1.0), ValueError, "p must be in"),
        (lambda: ds.Dropout(-0.5), ValueError, "p must be in"),
        (lambda: ds.Dropout("a"), TypeError, "p must be a float"),
        (lambda: ds.Dropout(0.5, shared_dims=("x",)), TypeError, "shared_dims"),
        (lambda: ds.Dropout(0.5, shared_dims=(0,), batch_dim=0), ValueError, "batch_dim"),
        (lambda: ds.DropConnect(nn.Linear(2, 2), "nope", 0.5), ValueError, "no parameter"),
        (lambda: ds.DropConnect("lin", "weight", 0.5), TypeError, "nn.Module"),
        (lambda: ds.DropConnect(nn.Linear(2, 2), "weight", 0.5, (3,)), ValueError, "range"),
    ],
    ids=["p=1", "p<0", "p-str", "dims-str", "batch-shared", "no-param", "not-module", "bad-dim"],
)
def test_bad_site_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "shared_dims, shape, batch_dim",
    [((0,), (5, 4, 3), 1), ((), (4, 3), 0), ((-2, -1), (4, 2, 3, 3), 0), ((0, 1), (2, 3, 4), 2)],
    ids=["locked-TBH", "elementwise", "channel-NCHW", "two-shared"],
)
def test_the_batch_dimension_is_the_first_unshared_one(shared_dims, shape, batch_dim):
    """``ds.Dropout(p, shared_dims=(0,))`` is locked dropout for ``(T, B, H)`` as documented."""
    site = ds.Dropout(0.4, shared_dims=shared_dims)
    assert site.batch_dim_of(len(shape)) == batch_dim
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with ds.site_context(site, ds.SiteContext("sample", gens)) as ctx:
        site(torch.ones(shape))
    (mask,) = ctx.gates
    expected = [
        1 if d % len(shape) in {s % len(shape) for s in shared_dims} else n
        for d, n in enumerate(shape)
    ]
    assert list(mask.shape) == expected
    half = shape[batch_dim] // 2
    first, second = mask.split(half, dim=batch_dim)
    assert not torch.equal(first, second)  # one mask per replica along the inferred batch dim


def test_a_shared_batch_dimension_is_refused():
    with pytest.raises(ValueError, match="batch_dim 0 cannot be one of shared_dims"):
        ds.Dropout(0.4, shared_dims=(0,), batch_dim=0)
    with pytest.raises(ValueError, match="no batch dimension left"):
        ds.Dropout(0.4, shared_dims=(0, 1)).batch_dim_of(2)


def test_public_modules_are_not_shadowed_and_names_are_exported():
    import dropsplit.models as models

    assert callable(ds.sites) and ds.SiteContext is not None
    assert {"LSTM", "LSTMLayer", "AWDLSTM", "ElmanRNN", "TinyRNNLM"} <= set(models.__all__)
    for name in ds.__all__:
        assert getattr(ds, name) is not None
