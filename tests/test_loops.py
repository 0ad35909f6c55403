"""Methods in the loops users already run: the Hugging Face Trainer, Lightning, the examples.

Each loop's first optimizer step must carry exactly the gradient of the plain method on the
micro-batches it saw, with the same draws (the method seeded identically on a fresh copy of
the model), micro-batches weighted as the loop weights them. Models are tiny and built from
configs (no hub); the tests of a library skip with the reason when it cannot be imported.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropsplit as ds
from dropsplit.integrations.hf_forward import (
    causal_lm_forward,
    classification_forward,
    count_causal_lm_targets,
    count_classification_targets,
)

ROOT = Path(__file__).resolve().parents[1]


def import_or_skip(name):
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        pytest.skip(f"{name} cannot be imported here ({type(err).__name__}: {err})")


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_import_dropsplit_imports_no_training_framework():
    code = (
        "import sys, dropsplit, dropsplit.integrations, dropsplit.integrations.hf_forward\n"
        "print(*[m in sys.modules for m in "
        "('transformers', 'accelerate', 'lightning', 'pytorch_lightning')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] * 4


# --- transformers: forward functions ---------------------------------------------------------

VOCAB, LENGTH = 40, 8


def gpt2(seed=0):
    t = import_or_skip("transformers")
    t.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = t.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every dropout taken over
        return ds.convert(t.GPT2LMHeadModel(config)).train()


def bert_classifier():
    t = import_or_skip("transformers")
    t.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = t.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return ds.convert(t.BertForSequenceClassification(config)).train()


def lm_examples(kept=(7, 6, 5, 3)):
    """One example per entry, with that many targets after the shift (the rest -100), so
    that every split into two micro-batches has unequal target counts."""
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in kept:
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=g)
        mask = torch.ones(LENGTH, dtype=torch.long)
        mask[n + 1 :] = 0  # right padding
        labels = ids.masked_fill(mask == 0, -100)
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return examples


def collate(examples):
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def test_causal_lm_forward_gives_the_models_own_loss():
    torch.set_default_dtype(torch.float32)  # the model's loss is computed in float32
    model = gpt2().eval()
    batch = collate(lm_examples())
    batch["labels"][1, 2] = -100  # a prompt token inside the sequence
    logits, targets = causal_lm_forward(model, batch)
    assert logits.shape == (7 + 6 + 5 + 3 - 1, VOCAB) and targets.shape == logits.shape[:1]
    assert count_causal_lm_targets(batch) == targets.numel()
    own = model(**batch).loss
    torch.testing.assert_close(F.cross_entropy(logits, targets), own, rtol=1e-6, atol=0)
    # shift_labels (padding-free collators) are used as they are
    shifted = {k: v for k, v in batch.items() if k != "labels"}
    shifted["shift_labels"] = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(F.cross_entropy(*causal_lm_forward(model, shifted)), own)
    # without labels: the inputs, padding ignored
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    plain = collate(lm_examples())
    torch.testing.assert_close(
        F.cross_entropy(*causal_lm_forward(model, unlabeled)), model(**plain).loss
    )


def test_classification_forward_gives_the_models_own_loss():
    torch.set_default_dtype(torch.float32)
    model = bert_classifier().eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, VOCAB, (4, LENGTH), generator=g),
        "attention_mask": torch.ones(4, LENGTH, dtype=torch.long),
        "labels": torch.tensor([0, 2, 1, 2]),
    }
    logits, labels = classification_forward(model, batch)
    assert logits.shape == (4, 3) and count_classification_targets(batch) == 4
    torch.testing.assert_close(
        F.cross_entropy(logits, labels), model(**batch).loss, rtol=1e-6, atol=0
    )
    with pytest.raises(ValueError, match="labels"):
        classification_forward(model, {"input_ids": batch["input_ids"]})


# --- transformers: the Trainer -----------------------------------------------------------------

HF_METHODS = {
    "dropout-1": lambda: ds.DropoutK(1, seed=5),
    "dropout-2-analytic": lambda: ds.DropoutK(2, noise="analytic", seed=5),
}


def hf_trainer(model, method, tmp_path, *, grads, seen, **arguments):
    """A DropsplitTrainer that records each micro-batch it steps on and the gradient the
    optimizer receives (before clipping, which is off)."""
    t = import_or_skip("transformers")
    import_or_skip("accelerate")
    from dropsplit.integrations.hf_trainer import DropsplitTrainer

    class Recording(DropsplitTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    class GradientCallback(t.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append(flat_grad(model).clone())

    defaults = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "per_device_train_batch_size": 2,
        "max_steps": 1,
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "seed": 0,
    }
    args = t.TrainingArguments(**{**defaults, **arguments})
    return Recording(
        model=model,
        args=args,
        train_dataset=lm_examples(),
        method=method,
        callbacks=[GradientCallback()],
    )


def plain_method_gradient(model, method, micro_batches, forward_fn=causal_lm_forward):
    """The method's gradient over micro-batches weighted by their share of the targets."""
    counts = [count_causal_lm_targets(b) for b in micro_batches]
    losses = []
    for batch, n in zip(micro_batches, counts, strict=True):
        weight = n / sum(counts)
        result = method.step(
            model, forward_fn, batch, backward=lambda t, w=weight: (w * t).backward()
        )
        losses.append(weight * result.loss)
    return flat_grad(model), sum(losses), counts


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("method_name", list(HF_METHODS))
def test_trainer_step_is_the_plain_methods_gradient(tmp_path, method_name, accumulation):
    grads, seen = [], []
    trainer = hf_trainer(
        gpt2(), HF_METHODS[method_name](), tmp_path, grads=grads, seen=seen,
        gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    trainer.train()
    assert len(seen) == accumulation and len(grads) == 1
    want, loss, counts = plain_method_gradient(gpt2(), HF_METHODS[method_name](), seen)
    if accumulation == 2:
        assert counts[0] != counts[1]  # the weights are the target shares, not 1/2
    assert relative(grads[0], want) < 1e-12  # measured 1e-16 to 3e-16 (float64)
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(loss, rel=1e-12)
    assert "dropsplit/objective" in logged


BF16_METHODS = {
    "dropout-1": (lambda: ds.DropoutK(1, seed=5), 1e-6),  # measured 0
    # its differences run in float32 (outside autocast); float32 rounding (1.2e-7) of the
    # passes divided by the displacement (1e-3) bounds the agreement: measured 2.3e-5, also
    # between this Trainer and the plain loop without any autocast (summation order)
    "analytic-hvp-difference": (lambda: ds.Analytic(gradient="hvp-difference", seed=5), 1e-3),
}


@pytest.mark.parametrize("method_name", list(BF16_METHODS))
def test_trainer_in_bfloat16_autocast_on_the_cpu(tmp_path, method_name):
    """bf16=True, use_cpu=True: the step runs in accelerate's CPU autocast. Same draws: the
    gradient is the plain method's under ``torch.autocast``, which the difference estimators
    see (accelerate's autocast-inside-forward would hide it from them)."""
    torch.set_default_dtype(torch.float32)
    make, tolerance = BF16_METHODS[method_name]
    grads, seen = [], []
    model = gpt2()
    trainer = hf_trainer(
        model, make(), tmp_path, grads=grads, seen=seen, bf16=True, gradient_accumulation_steps=2
    )
    trainer.train()
    assert model.forward != model._original_forward  # accelerate's wrapper is back
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _, _ = plain_method_gradient(gpt2(), make(), seen)
    assert relative(grads[0], autocast) < tolerance
    if method_name == "dropout-1":
        float32, _, _ = plain_method_gradient(gpt2(), make(), seen)
        # bfloat16 keeps 8 significant bits (relative rounding 2**-9 = 2e-3 per operation);
        # over two layers the gradient stays within a few times 2**-8 = 3.9e-3
        error = relative(grads[0], float32)
        assert 0 < error < 3e-2, error  # measured 3.8e-3 to 4.6e-3; > 0: autocast acted


def test_trainer_trains_a_classifier_and_checkpoints_the_method(tmp_path):
    t = import_or_skip("transformers")
    import_or_skip("accelerate")
    from dropsplit.integrations.hf_trainer import DropsplitTrainer

    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(1, VOCAB, (LENGTH,), generator=g),
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": torch.tensor(i % 3),
        }
        for i in range(8)
    ]
    model = bert_classifier()
    before = [p.detach().clone() for p in model.parameters()]
    args = t.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        logging_steps=1, save_strategy="steps", save_steps=2, seed=0,
    )  # fmt: skip
    method = ds.Analytic(seed=1)
    trainer = DropsplitTrainer(
        model=model, args=args, train_dataset=data, method=method,
        forward_fn=classification_forward,
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert all(e["dropsplit/explicit"] > 0 for e in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # the method's generator state is saved with the checkpoint and restored on resume
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "dropsplit_method.pt").is_file()
    other = ds.Analytic(seed=99)
    resumed = DropsplitTrainer(model=model, args=args, train_dataset=data, method=other)
    resumed._load_rng_state(str(checkpoint))
    assert torch.equal(other.state_dict()["generator"], method.state_dict()["generator"])


def test_trainer_refuses_what_the_method_replaces(tmp_path):
    t = import_or_skip("transformers")
    import_or_skip("accelerate")
    from dropsplit.integrations.hf_trainer import DropsplitTrainer

    model = gpt2()
    args = t.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="method must be a dropsplit method"):
        DropsplitTrainer(model=model, args=args, method="dropout")
    with pytest.raises(ValueError, match="compute_loss_func"):
        DropsplitTrainer(
            model=model, args=args, method=ds.NoDropout(), compute_loss_func=lambda *a, **k: 0
        )
    smoothed = t.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", label_smoothing_factor=0.1
    )
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        DropsplitTrainer(model=model, args=smoothed, method=ds.NoDropout())
    trainer = DropsplitTrainer(
        model=model, args=args, method=ds.NoDropout(), forward_fn=lambda m, b: b
    )
    assert trainer.count_targets is None  # an unknown forward: micro-batches weigh equally


# --- Lightning ---------------------------------------------------------------------------------


def mlp_forward(module, batch):
    x, y = batch
    return module(x), y


def lightning_module(method, **options):
    import_or_skip("lightning")
    from dropsplit.integrations.lightning import DropsplitModule

    class Net(DropsplitModule):
        def __init__(self):
            super().__init__(method, mlp_forward, **options)
            self.l1 = nn.Linear(4, 8)
            self.dropout = ds.Dropout(0.3)
            self.l2 = nn.Linear(8, 3)
            self.seen, self.grads = [], []
            self.scheduler = None

        def forward(self, x):
            return self.l2(self.dropout(torch.tanh(self.l1(x))))

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(b.clone() for b in batch))
            return super().training_step(batch, batch_idx)

        def on_before_optimizer_step(self, optimizer):
            self.grads.append(flat_grad(self).clone())
            super().on_before_optimizer_step(optimizer)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            if self.scheduler is None:
                return optimizer
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    torch.manual_seed(1)
    return Net()


def fit(module, max_steps, precision="32-true"):
    lightning = import_or_skip("lightning")
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=4)
    trainer = lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", precision=precision, logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and tips
        trainer.fit(module, loader)
    return trainer


LIGHTNING_METHODS = {
    "dropout-2-analytic": lambda: ds.DropoutK(2, noise="analytic", seed=3),
    "analytic": lambda: ds.Analytic(seed=3),
}


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("method_name", list(LIGHTNING_METHODS))
def test_lightning_step_is_the_plain_methods_gradient(method_name, accumulation):
    module = lightning_module(
        LIGHTNING_METHODS[method_name](), accumulate_grad_batches=accumulation
    )
    trainer = fit(module, max_steps=2)
    assert trainer.global_step == 2 and len(module.seen) == 2 * accumulation
    assert len(module.grads) == 2
    reference = lightning_module(ds.NoDropout(seed=0))  # same init: seeded in the builder
    method = LIGHTNING_METHODS[method_name]()
    for batch in module.seen[:accumulation]:  # Lightning's rule: each divided by their number
        method.step(reference, mlp_forward, batch, backward=lambda t: (t / accumulation).backward())
    assert relative(module.grads[0], flat_grad(reference)) < 1e-12  # measured 0 (float64)
    assert "dropsplit/objective" in trainer.callback_metrics


@pytest.mark.parametrize(
    "make",
    [lambda: ds.DropoutK(1, seed=3), lambda: ds.Analytic(gradient="hvp-difference", seed=3)],
    ids=["dropout-1", "analytic-hvp-difference"],
)
def test_lightning_bf16_mixed_is_the_plain_method_under_autocast(make):
    """precision="bf16-mixed": the step runs inside Lightning's autocast, so it is the plain
    loop's ``method.step`` in ``torch.autocast`` (the difference estimators leave it)."""
    torch.set_default_dtype(torch.float32)
    module = lightning_module(make(), accumulate_grad_batches=2)
    fit(module, max_steps=1, precision="bf16-mixed")
    reference = lightning_module(ds.NoDropout(seed=0))
    method = make()
    for batch in module.seen:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            method.step(reference, mlp_forward, batch, backward=lambda t: (t / 2).backward())
    assert relative(module.grads[0], flat_grad(reference)) < 1e-6  # measured 0


def test_lightning_clips_and_steps_its_scheduler():
    module = lightning_module(ds.DropoutK(1, seed=0), gradient_clip_val=1e-3)
    module.scheduler = True
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module, max_steps=1)
    moved = torch.cat(
        [(a - p.detach()).reshape(-1) for a, p in zip(before, module.parameters(), strict=True)]
    )
    assert module.grads[0].norm() > 1e-2  # recorded before clipping
    assert moved.norm() == pytest.approx(1e-3, rel=1e-6)  # lr 1, clipped to norm 1e-3
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5  # one "step"-interval step


def test_lightning_module_checks_its_arguments():
    import_or_skip("lightning")
    from dropsplit.integrations.lightning import DropsplitModule

    with pytest.raises(TypeError, match="method"):
        DropsplitModule("dropout", mlp_forward)
    with pytest.raises(TypeError, match="forward_fn"):
        DropsplitModule(ds.NoDropout(), None)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        DropsplitModule(ds.NoDropout(), mlp_forward, accumulate_grad_batches=0)


# --- the examples ------------------------------------------------------------------------------

EXAMPLES = {
    "amp_accumulation.py": (),
    "hf_trainer.py": ("transformers", "accelerate"),
    "lightning_recipe.py": ("lightning",),
}


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_runs(example):
    for library in EXAMPLES[example]:
        import_or_skip(library)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "final:" in out.stdout and "loss" in out.stdout
