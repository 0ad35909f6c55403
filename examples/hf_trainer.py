"""The Hugging Face ``Trainer`` training a tiny GPT-2 with a dropsplit method.

The model is built from a config (random init, nothing downloaded) and converted with
``ds.convert``, so its dropout modules and its attention dropout are dropsplit sites;
:class:`~dropsplit.integrations.hf_trainer.DropsplitTrainer` then runs the method in each
training step, with the ``Trainer``'s bfloat16 autocast and gradient accumulation. The text is
tokenized by a character map (no tokenizer download); the output directory is a temporary one.

Run: ``python examples/hf_trainer.py`` (needs ``pip install "dropsplit[integrations]"``).
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import dropsplit as ds
from dropsplit.integrations.hf_trainer import DropsplitTrainer, causal_lm_forward

TEXT = """\
It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife. However little known the
feelings or views of such a man may be on his first entering a
neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property of
some one or other of their daughters.
"""
BLOCK = 32  # characters per training example


def char_dataset(text: str, vocab: dict[str, int]) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping blocks of ``BLOCK`` characters, as a list of ``Trainer`` examples.

    The labels are the inputs (the model shifts them); the last, shorter block is padded, its
    padding labelled -100.
    """
    ids = torch.tensor([vocab[c] for c in text])
    examples = []
    for start in range(0, len(ids), BLOCK):
        block = ids[start : start + BLOCK]
        pad = BLOCK - len(block)
        mask = torch.cat([torch.ones(len(block)), torch.zeros(pad)]).long()
        block = torch.cat([block, torch.zeros(pad, dtype=torch.long)])
        labels = block.masked_fill(mask == 0, -100)
        examples.append({"input_ids": block, "attention_mask": mask, "labels": labels})
    return examples


def main() -> None:
    """Train a few steps with Dropout_2 plus its analytic noise and print the losses."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    vocab = {c: i + 1 for i, c in enumerate(sorted(set(TEXT)))}  # 0: padding
    config = transformers.GPT2Config(
        vocab_size=len(vocab) + 1, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = ds.convert(transformers.GPT2LMHeadModel(config))  # dropout -> dropsplit sites
    data = char_dataset(TEXT, vocab)

    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            use_cpu=not torch.cuda.is_available(),
            bf16=True,  # autocast in bfloat16 (the CPU and recent GPUs have it)
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=8,
            learning_rate=3e-3,
            logging_steps=4,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,  # the Trainer prints its logs instead of a progress bar
            seed=0,
        )
        trainer = DropsplitTrainer(
            model=model,
            args=args,
            train_dataset=data,
            eval_dataset=data,
            method=ds.DropoutK(2, noise="analytic", seed=0),
            forward_fn=causal_lm_forward,  # the default, shown here
        )
        trainer.train()
        evaluation = trainer.evaluate()  # the model's own loss, sites off
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    print(
        f"final: step {last['step']}  train loss {last['loss']:.4f}  "
        f"implicit {last['dropsplit/implicit']:+.4f}  eval loss {evaluation['eval_loss']:.4f}"
    )


if __name__ == "__main__":
    main()
