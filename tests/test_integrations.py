"""ds.convert on models built elsewhere: torch modules, stochastic depth, transformers, timm.

transformers models are tiny, built from configs with random init (no hub); the tests that need
transformers or timm skip with the reason when the library cannot be imported. timm's attention
hook is also tested on a stand-in with timm's ``Attention`` interface (see ``TimmLikeAttention``),
so it runs where timm cannot be imported.
"""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropsplit as ds
from dropsplit.core.sites import SiteContext, site_context

# --- helpers -------------------------------------------------------------------------------


def import_or_skip(name: str):
    """``pytest.importorskip`` that also skips a library that is installed but fails to import
    (timm imports torchvision, whose CUDA-built wheel fails on a CPU torch)."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        pytest.skip(f"{name} cannot be imported here ({type(err).__name__}: {err})")


def params(model):
    return [p for p in model.parameters() if p.requires_grad]


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params(model)]


def zero_grads(model):
    for p in params(model):
        p.grad = None


def step_grads(method, model, forward_fn, batch):
    zero_grads(model)
    result = method.step(model, forward_fn, batch)
    return result, grads(model)


def relative(a, b):
    flat_a = torch.cat([x.reshape(-1) for x in a])
    flat_b = torch.cat([x.reshape(-1) for x in b])
    return ((flat_a - flat_b).norm() / flat_b.norm()).item()


def set_every_p(model, p):
    for site in ds.sites(model):
        site.p = p


def sites_called(model, forward_fn, batch):
    """The sites one sampled forward calls (each site set to p > 0 acts in "sample" mode)."""
    ctx = SiteContext("sample", [torch.Generator().manual_seed(0)])
    with site_context(model, ctx):
        forward_fn(model, batch)
    return [site for site, _ in ctx.record]


def converted(model, batch_dim=None):
    """``ds.convert`` that fails the test on any warning (everything must be taken over)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ds.convert(model, batch_dim=batch_dim)


TWO_PASS_METHODS = {
    "no-dropout": lambda: ds.NoDropout(seed=0),
    "dropout-1": lambda: ds.DropoutK(1, seed=0),
    "rdrop": lambda: ds.RDrop(0.5, seed=0),
    "fraternal": lambda: ds.Fraternal(0.2, seed=0),
}


def assert_step_is_the_objective_gradient(method, model, forward_fn, batch):
    """The step's gradient equals autograd of the method's objective with the same draws."""
    state = copy.deepcopy(method.state_dict())
    _, got = step_grads(method, model, forward_fn, batch)
    method.load_state_dict(state)
    zero_grads(model)
    value = method.objective(model, forward_fn, batch).value
    want = torch.autograd.grad(value, params(model), allow_unused=True)
    want = [
        torch.zeros_like(p) if g is None else g for p, g in zip(params(model), want, strict=True)
    ]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --- torch modules and the report --------------------------------------------------------------


def test_import_dropsplit_imports_neither_transformers_nor_timm():
    code = "import sys, dropsplit; print('transformers' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_method_on_a_model_without_sites_says_what_convert_found():
    model = nn.Module()
    model.rnn = nn.LSTM(3, 4, num_layers=2, dropout=0.2)
    with pytest.warns(UserWarning, match=r"rnn \(dropout=0.2\): LSTM's inter-layer dropout"):
        ds.convert(model)
    with pytest.raises(ValueError, match=r"could not take over: rnn \(dropout=0.2\)"):
        ds.DropoutK(1).objective(model, lambda m, b: b, None)
    plain = ds.convert(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="found no dropout to take over"):
        ds.DropoutK(1).objective(plain, lambda m, b: b, None)
    with pytest.raises(ValueError, match=r"call ds.convert\(model\) first"):
        ds.DropoutK(1).objective(nn.Linear(2, 2), lambda m, b: b, None)


def test_dropout_like_floats_and_classes_are_named():
    model = nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.3))
    model.head_drop_rate = 0.25  # a functional head dropout, as in many timm CNNs
    with pytest.warns(UserWarning) as record:
        ds.convert(model)
    message = str(record[0].message)
    assert "(root) (head_drop_rate=0.25)" in message and "1 (p=0.3)" in message


def test_second_convert_applies_its_batch_dim_and_adds_nothing():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Dropout1d(0.2))
    ds.convert(model, batch_dim=1)
    first = ds.sites(model)
    assert [s.batch_dim for s in first] == [1, 1]
    ds.convert(model)
    assert ds.sites(model) == first and [s.batch_dim for s in first] == [None, None]
    with pytest.raises(ValueError, match="shares its mask over"):
        ds.convert(model, batch_dim=-1)  # Dropout1d's mask is shared over the last dim
    assert [s.batch_dim for s in first] == [None, None]  # nothing changed
    with pytest.raises(TypeError, match="batch_dim"):
        ds.convert(model, batch_dim=1.0)


# --- stochastic depth ------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stand-in for timm's ``DropPath`` (timm 1.0.31 ``layers/drop.py``, same attributes)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor


class StochasticDepth(nn.Module):
    """Stand-in for torchvision's ``StochasticDepth`` (``ops/stochastic_depth.py``)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):  # pragma: no cover - replaced by convert
        raise AssertionError("convert replaces it")


class ResidualNet(nn.Module):
    """Residual blocks ``x + drop_path(mlp(x))`` over tokens ``[B, L, D]``, a pooled head."""

    def __init__(self, width=6, classes=3, p=0.2):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.paths = nn.ModuleList([DropPath(p), StochasticDepth(p, "row")])
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.inp(x)
        for block, path in zip(self.blocks, self.paths, strict=True):
            h = h + path(torch.tanh(block(h)))
        return self.head(self.drop(h.mean(1)))


def residual_forward(model, batch):
    x, y = batch
    return model(x), y


ALL_METHODS = {
    **TWO_PASS_METHODS,
    "dropout-3-batch": lambda: ds.DropoutK(3, implementation="batch", seed=0),
    "dropout-2-difference": lambda: ds.DropoutK(2, "difference", seed=0),
    "dropout-2-analytic": lambda: ds.DropoutK(2, "analytic", seed=0),
    "analytic": lambda: ds.Analytic(seed=0),
    "analytic-hvp": lambda: ds.Analytic(gradient="hvp-difference", seed=0),
    "analytic-fd": lambda: ds.Analytic(gradient="finite-difference", seed=0),
}


def test_stochastic_depth_becomes_a_site_with_one_mask_value_per_example():
    torch.manual_seed(0)
    model = converted(ResidualNet())
    names = [n for n, _ in ds.named_sites(model)]
    assert names == ["paths.0", "paths.1", "drop"]
    assert all(isinstance(model.paths[i], ds.ExampleDropout) for i in (0, 1))
    batch = (torch.randn(5, 7, 4), torch.randint(0, 3, (5,)))
    ctx = SiteContext("sample", [torch.Generator().manual_seed(1)])
    with site_context(model, ctx):
        model(batch[0])
    masks = [m for s, m in ctx.record if isinstance(s, ds.ExampleDropout)]
    assert [tuple(m.shape) for m in masks] == [(5, 1, 1)] * 2
    assert set(torch.cat(masks).unique().tolist()) <= {0.0, 1 / 0.8}
    site = ds.ExampleDropout(0.5)
    out = site(torch.ones(400, 3, 2, 2))  # [B, C, H, W] as well: one value per example
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))
    assert (out == 0).any() and (out == 2).any()


@pytest.mark.parametrize("method_name", list(ALL_METHODS))
def test_every_method_runs_on_a_converted_residual_net(method_name):
    torch.manual_seed(0)
    model = converted(ResidualNet())
    batch = (torch.randn(6, 5, 4), torch.randint(0, 3, (6,)))
    result, got = step_grads(ALL_METHODS[method_name](), model, residual_forward, batch)
    assert result.finite and all(torch.isfinite(g).all() for g in got)
    if method_name in TWO_PASS_METHODS:
        assert_step_is_the_objective_gradient(
            ALL_METHODS[method_name](), model, residual_forward, batch
        )


def test_stochastic_depth_that_is_not_the_noise_law_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), DropPath(0.1, scale_by_keep=False))
    model.add_module("row", StochasticDepth(0.1, "batch"))
    with pytest.warns(UserWarning) as record:
        ds.convert(model)
    message = str(record[0].message)
    assert "1 (drop_prob=0.1, scale_by_keep=False)" in message
    assert "row (p=0.1, mode='batch')" in message
    assert ds.sites(model) == [] and type(model[1]) is DropPath


# --- timm-style attention, on a stand-in -------------------------------------------------------


class TimmLikeAttention(nn.Module):
    """Mirrors timm 1.0.31 ``layers/attention.py`` ``Attention`` (no qk-norm, gate or mask):
    the same attributes (``qkv``, ``attn_drop``, ``proj``, ``proj_drop``, ``fused_attn``,
    ``scale``) and the same forward, so the hook that ds.convert registers is tested here."""

    def __init__(self, dim, num_heads=2, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True  # timm's use_fused_attn() default
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_calls = 0  # test instrumentation only

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            self.fused_calls += 1
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TinyViT(nn.Module):
    """Pre-norm blocks of stand-in timm attention, a GELU MLP and DropPath, as timm's ViT."""

    def __init__(self, dim=8, classes=3, p=0.1):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.pos_drop = nn.Dropout(p)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            block.attn = TimmLikeAttention(dim, attn_drop=p, proj_drop=p)
            block.drop_path1, block.drop_path2 = DropPath(p), DropPath(p)
            block.mlp = nn.Sequential(
                nn.Linear(dim, 16), nn.GELU(), nn.Dropout(p), nn.Linear(16, dim)
            )
            self.blocks.append(block)
        self.head_drop = nn.Dropout(p)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.pos_drop(self.embed(x))
        for b in self.blocks:
            x = x + b.drop_path1(b.attn(b.norm1(x)))
            x = x + b.drop_path2(b.mlp(b.norm2(x)))
        return self.head(self.head_drop(x.mean(1)))


def vit_batch():
    return (
        torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(2)),
        torch.tensor([0, 1, 2, 1]),
    )


def test_timm_attention_hook_keeps_fused_kernels_only_where_the_site_cannot_act():
    torch.manual_seed(0)
    model = converted(TinyViT())
    attn = model.blocks[0].attn
    assert isinstance(attn.attn_drop, ds.Dropout) and len(attn._forward_pre_hooks) == 1
    assert attn.attn_drop in sites_called(model, residual_forward, vit_batch())
    x = vit_batch()[0]

    def fused_after(run):
        before = attn.fused_calls
        run()
        return attn.fused_calls > before

    assert fused_after(lambda: model.eval()(x))  # eval: the site cannot act
    model.train()
    assert not fused_after(lambda: model(x))  # plain dropout training: the site acts
    with site_context(model, SiteContext("off")):  # the fused call would drop with p
        assert not fused_after(lambda: model(x))
    with site_context(model, SiteContext("gate", twice=False)):
        assert not fused_after(lambda: model(x))
    set_every_p(model, 0.0)
    assert fused_after(lambda: model(x))  # nothing to drop: fused in training too
    with site_context(model, SiteContext("gate")):  # twice differentiated: never fused
        assert not fused_after(lambda: model(x))
    model.eval()
    fused = model(x)
    attn.attn_drop.train()  # an acting site with p = 0 computes the same values unfused
    with site_context(model, SiteContext("gate")):
        torch.testing.assert_close(model(x), fused)
    converted(model)  # a second convert adds no second hook
    assert len(attn._forward_pre_hooks) == 1


def test_timm_attention_built_unfused_stays_unfused():
    model = TinyViT()
    for b in model.blocks:
        b.attn.fused_attn = False  # as timm with TIMM_FUSED_ATTN=0
    model = converted(model).eval()
    model(vit_batch()[0])
    assert model.blocks[0].attn.fused_calls == 0


def test_timm_like_vit_every_dropout_is_a_site_and_methods_agree():
    torch.manual_seed(0)
    model = converted(TinyViT()).train()
    batch = vit_batch()
    called = sites_called(model, residual_forward, batch)
    assert set(called) == set(ds.sites(model)) and len(ds.sites(model)) == 12
    with site_context(model, SiteContext("off")):
        torch.testing.assert_close(model(batch[0]), model(batch[0]), rtol=0, atol=0)
    for make in TWO_PASS_METHODS.values():
        assert_step_is_the_objective_gradient(make(), model, residual_forward, batch)
    _, exact = step_grads(ds.Analytic(seed=0), model, residual_forward, batch)
    _, hvp = step_grads(
        ds.Analytic(gradient="hvp-difference", seed=0), model, residual_forward, batch
    )
    assert relative(hvp, exact) < 2e-3  # measured 1e-4 to 8e-4


def test_real_timm_vit_is_fully_sited():
    import_or_skip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3,
        drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1,
        drop_path_rate=0.1,
    )  # fmt: skip
    model = converted(model).train()
    batch = (torch.randn(2, 3, 16, 16), torch.tensor([0, 2]))
    assert set(sites_called(model, residual_forward, batch)) == set(ds.sites(model))
    assert any(isinstance(s, ds.ExampleDropout) for s in ds.sites(model))
    with site_context(model, SiteContext("off")):
        torch.testing.assert_close(model(batch[0]), model(batch[0]), rtol=0, atol=0)
    for make in TWO_PASS_METHODS.values():
        assert_step_is_the_objective_gradient(make(), model, residual_forward, batch)
    _, exact = step_grads(ds.Analytic(seed=0), model, residual_forward, batch)
    _, hvp = step_grads(
        ds.Analytic(gradient="hvp-difference", seed=0), model, residual_forward, batch
    )
    assert relative(hvp, exact) < 2e-3  # measured 1e-4 to 8e-4


# --- transformers ------------------------------------------------------------------------------

VOCAB, LENGTH, BATCH = 50, 8, 4


def build(family, implementation):
    """A tiny config-built model (random init, no hub) of ``family``, every dropout at 0.1."""
    t = import_or_skip("transformers")
    t.logging.set_verbosity_error()
    common = {"vocab_size": VOCAB, "attn_implementation": implementation}
    if family == "gpt2":
        config = t.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, **common
        )
        return t.GPT2LMHeadModel(config)
    if family == "bert":
        config = t.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, num_labels=3, **common,
        )  # fmt: skip
        return t.BertForSequenceClassification(config)
    if family == "distilbert":
        config = t.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32,
            num_labels=3, **common,
        )  # fmt: skip
        return t.DistilBertForSequenceClassification(config)
    config = t.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.1,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **common,
    )  # fmt: skip
    return t.LlamaForCausalLM(config)


def causal_lm_forward(model, batch):
    """Next-token logits and targets of the unpadded positions, flattened."""
    ids, mask, _ = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = mask[:, 1:].bool()
    return logits[keep], ids[:, 1:][keep]


def classifier_forward(model, batch):
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask).logits, labels


FAMILIES = {
    "gpt2": causal_lm_forward,
    "bert": classifier_forward,
    "distilbert": classifier_forward,
    "llama": causal_lm_forward,
}
CASES = [(f, i) for f in FAMILIES for i in ("eager", "sdpa")]
IDS = [f"{f}-{i}" for f, i in CASES]


def hf_batch(padded=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=g)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if padded:
        mask[0, LENGTH - 3 :] = 0  # right padding: masked keys, as a tokenizer pads
    return ids, mask, torch.tensor([0, 1, 2, 1])


def converted_hf(family, implementation):
    torch.manual_seed(0)
    model = converted(build(family, implementation)).train()
    set_every_p(model, 0.1)
    return model


@pytest.mark.parametrize("family, implementation", CASES, ids=IDS)
def test_every_dropout_of_the_model_is_a_site_it_calls(family, implementation):
    model = converted_hf(family, implementation)
    assert model.config._attn_implementation == "dropsplit"
    attention = [s for s in ds.sites(model) if s._dropsplit_origin == "attention"]
    assert len(attention) == 2  # one per layer, listed once (no zombie site)
    called = sites_called(model, FAMILIES[family], hf_batch())
    assert len(called) == len(set(called)) and set(called) == set(ds.sites(model))
    before = [n for n, _ in ds.named_sites(model)]
    converted(model)  # idempotent
    assert [n for n, _ in ds.named_sites(model)] == before


@pytest.mark.parametrize("family, implementation", CASES, ids=IDS)
def test_sites_off_in_training_mode_is_deterministic(family, implementation):
    model = converted_hf(family, implementation)
    forward_fn, batch = FAMILIES[family], hf_batch()
    with site_context(model, SiteContext("off")):
        first, _ = forward_fn(model, batch)
        second, _ = forward_fn(model, batch)
    assert torch.equal(first, second)
    model.eval()  # and it is the eval forward (the fused path) up to rounding
    torch.testing.assert_close(forward_fn(model, batch)[0], first)
    for module in model.modules():  # the explicit (twice-differentiable) path, idle site
        if hasattr(module, "differentiated_twice"):
            module.differentiated_twice = True
    torch.testing.assert_close(forward_fn(model, batch)[0], first)


@pytest.mark.parametrize("family, implementation", CASES, ids=IDS)
def test_dropout_1_with_p_zero_is_plain_autograd(family, implementation):
    model = converted_hf(family, implementation)
    set_every_p(model, 0.0)
    forward_fn, batch = FAMILIES[family], hf_batch()
    _, got = step_grads(ds.DropoutK(1, seed=0), model, forward_fn, batch)
    zero_grads(model)
    logits, targets = forward_fn(model, batch)
    F.cross_entropy(logits, targets).backward()
    for a, b in zip(got, grads(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method_name", list(TWO_PASS_METHODS))
@pytest.mark.parametrize("family, implementation", CASES, ids=IDS)
def test_step_is_autograd_of_the_objective_with_the_same_draws(family, implementation, method_name):
    model = converted_hf(family, implementation)
    method = TWO_PASS_METHODS[method_name]()
    assert_step_is_the_objective_gradient(method, model, FAMILIES[family], hf_batch())


def test_sdpa_kernels_are_kept_where_the_site_cannot_act(monkeypatch):
    model = converted_hf("gpt2", "sdpa")
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    batch = hf_batch()
    model.eval()
    causal_lm_forward(model, batch)
    assert calls == [0.0, 0.0]  # fused, and never the model's own dropout
    model.train()
    with site_context(model, SiteContext("off")):
        causal_lm_forward(model, batch)
    assert calls == [0.0] * 4
    causal_lm_forward(model, batch)  # plain dropout training: the site acts, explicit path
    with site_context(model, SiteContext("gate")):
        causal_lm_forward(model, batch)
    assert calls == [0.0] * 4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_analytic_double_backward_runs_and_hvp_difference_agrees(family):
    model = converted_hf(family, "sdpa")
    forward_fn, batch = FAMILIES[family], hf_batch()
    result, exact = step_grads(ds.Analytic(seed=0), model, forward_fn, batch)
    assert result.finite and result.stats["explicit"] > 0
    _, hvp = step_grads(ds.Analytic(gradient="hvp-difference", seed=0), model, forward_fn, batch)
    assert relative(hvp, exact) < 2e-3  # measured 1e-4 to 8e-4


def test_double_backward_with_an_idle_attention_site_leaves_the_fused_kernel():
    # the attention site has p = 0 (never acts) but the method differentiates twice: the
    # module's differentiated_twice flag picks the explicit path (fused sdpa on the CPU has
    # no double backward)
    model = converted_hf("gpt2", "sdpa")
    for site in ds.sites(model):
        if site._dropsplit_origin == "attention":
            site.p = 0.0
    result, exact = step_grads(ds.Analytic(seed=0), model, causal_lm_forward, hf_batch())
    assert result.finite and all(torch.isfinite(g).all() for g in exact)


def test_batch_duplication_tiles_the_attention_site_like_the_loop():
    model = converted_hf("gpt2", "sdpa")
    batch = hf_batch(padded=False)
    loop, got_loop = step_grads(ds.DropoutK(3, seed=4), model, causal_lm_forward, batch)
    tiled, got_tiled = step_grads(
        ds.DropoutK(3, implementation="batch", seed=4), model, causal_lm_forward, batch
    )
    assert loop.loss == pytest.approx(tiled.loss, rel=1e-10)
    for a, b in zip(got_loop, got_tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_llama_float_attention_dropout_becomes_a_site_and_acts_nowhere_else():
    model = converted_hf("llama", "eager")
    attn = model.model.layers[0].self_attn
    assert attn.attention_dropout == 0.0 and isinstance(attn.attention_dropout_site, ds.Dropout)
    model.set_attn_implementation("sdpa")  # switched back by hand: the float drops nothing
    with site_context(model, SiteContext("off")):
        first, _ = causal_lm_forward(model, hf_batch())
        second, _ = causal_lm_forward(model, hf_batch())
    assert torch.equal(first, second)


CHECKPOINTED = {
    "dropout-1": lambda: ds.DropoutK(1, seed=0),
    "no-dropout": lambda: ds.NoDropout(seed=0),
    "r-drop": lambda: ds.RDrop(0.5, seed=0),
    "analytic-double-backward": lambda: ds.Analytic(seed=0),
    "analytic-hvp-difference": lambda: ds.Analytic(gradient="hvp-difference", seed=0),
}


@pytest.mark.parametrize("method_name", list(CHECKPOINTED))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing_with_replayed_masks_gives_the_same_gradient(family, method_name):
    """gradient_checkpointing_enable(ds.checkpoint_kwargs()): sites, branches, kernels replay."""
    forward_fn, batch = FAMILIES[family], hf_batch()
    _, plain = step_grads(
        CHECKPOINTED[method_name](), converted_hf(family, "sdpa"), forward_fn, batch
    )
    model = converted_hf(family, "sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ds.checkpoint_kwargs())
    _, recomputed = step_grads(CHECKPOINTED[method_name](), model, forward_fn, batch)
    assert relative(recomputed, plain) < 1e-12


def test_gradient_checkpointing_without_replay_is_a_clear_error():
    model = converted_hf("gpt2", "sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match="checkpoint_kwargs"):
        step_grads(ds.DropoutK(1, seed=0), model, causal_lm_forward, hf_batch())


@pytest.mark.parametrize("curvature", ["exact", "label"])
def test_stochastic_depth_regularizer_equals_brute_force_under_mask_grouping(curvature):
    """One mask value per example is one group: R_approx sums the branch's gradient over it."""
    from dropsplit import oracles

    torch.manual_seed(0)
    model = converted(ResidualNet())
    batch = (torch.randn(4, 5, 4), torch.randint(0, 3, (4,)))
    ours = ds.explicit_regularizer(model, residual_forward, batch, curvature, per_site=True)
    exact = oracles.exact_explicit_regularizer(model, residual_forward, batch, curvature)
    assert set(ours) == set(exact)
    for name in ("paths.0", "paths.1"):
        assert ours[name] > 0
        torch.testing.assert_close(ours[name], exact[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("family", ["gpt2", "bert", "distilbert"])
def test_jvp_is_double_backward_to_rounding_on_transformers_models(family):
    model = converted_hf(family, "sdpa")
    forward_fn, batch = FAMILIES[family], hf_batch()
    _, exact = step_grads(ds.Analytic(seed=0), model, forward_fn, batch)
    _, jvp = step_grads(ds.Analytic(gradient="jvp", seed=0), model, forward_fn, batch)
    assert relative(jvp, exact) < 1e-10


def test_jvp_names_the_op_it_cannot_differentiate_forward():
    """Llama's SiLU backward has no forward-mode rule in PyTorch: a clear error, not a number."""
    model = converted_hf("llama", "sdpa")
    with pytest.raises(NotImplementedError, match="silu_backward.*double-backward"):
        step_grads(ds.Analytic(gradient="jvp", seed=0), model, causal_lm_forward, hf_batch())


def test_timm_like_vit_jvp_is_double_backward_to_rounding():
    torch.manual_seed(0)
    model, batch = converted(TinyViT()).train(), vit_batch()
    _, exact = step_grads(ds.Analytic(seed=0), model, residual_forward, batch)
    _, jvp = step_grads(ds.Analytic(gradient="jvp", seed=0), model, residual_forward, batch)
    assert relative(jvp, exact) < 1e-10
