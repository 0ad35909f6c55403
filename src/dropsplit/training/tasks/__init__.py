"""What ``dropsplit train`` can train: a registry of tasks keyed by ``model.name``.

A task (:class:`~dropsplit.training.tasks.base.Task`) builds its model from the config, loads
its data, yields the training batches of an epoch, gives the ``forward_fn`` of the methods,
carries state between batches (a language model's recurrent state) and evaluates a split; the
trainer calls nothing else. Adding a task is one module and one entry of :data:`TASKS`.
"""

from __future__ import annotations

from dropsplit.training.tasks.base import Evaluation, Step, Task, pack_state, unpack_state
from dropsplit.training.tasks.digits import DigitsMLPTask
from dropsplit.training.tasks.hf_causal_lm import HFCausalLMTask
from dropsplit.training.tasks.lm import LanguageModelTask

TASKS: dict[str, type[Task]] = {
    "lstm": LanguageModelTask,
    "qrnn": LanguageModelTask,
    "transformer": LanguageModelTask,
    "hf-causal-lm": HFCausalLMTask,
    "digits-mlp": DigitsMLPTask,
}


def task_class(name: str) -> type[Task]:
    """The task ``model.name`` names.

    Raises:
        ValueError: One line listing the registered tasks, for a name that is none of them.
    """
    if name not in TASKS:
        raise ValueError(
            f"config key model.name must be one of the registered tasks ({', '.join(TASKS)}), "
            f"got {name!r}"
        )
    return TASKS[name]


__all__ = [
    "TASKS",
    "DigitsMLPTask",
    "Evaluation",
    "HFCausalLMTask",
    "LanguageModelTask",
    "Step",
    "Task",
    "pack_state",
    "task_class",
    "unpack_state",
]
