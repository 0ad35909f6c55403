"""Loss helpers computed two ways."""

import pytest
import torch
import torch.nn.functional as F

from dropsplit.core.losses import get_loss


@pytest.mark.parametrize("label_sets", [1, 2, 3], ids=["one-set", "two-sets", "three-sets"])
def test_shared_softmax_cross_entropy_equals_separate_cross_entropies(label_sets):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, requires_grad=True)
    targets = [torch.randint(0, 5, (7,), generator=g) for _ in range(label_sets)]
    weights = torch.randn(label_sets, 7, generator=g)
    shared = get_loss("cross_entropy").per_target_at(logits, *targets)
    separate = [F.cross_entropy(logits, t, reduction="none") for t in targets]
    torch.testing.assert_close(torch.stack(shared), torch.stack(separate))
    (grad_shared,) = torch.autograd.grad((weights * torch.stack(shared)).sum(), logits)
    (grad_separate,) = torch.autograd.grad((weights * torch.stack(separate)).sum(), logits)
    torch.testing.assert_close(grad_shared, grad_separate)


def test_shared_softmax_accumulates_repeated_labels():
    logits = torch.zeros(2, 3, requires_grad=True)
    y = torch.tensor([1, 1])
    (a, b) = get_loss("cross_entropy").per_target_at(logits, y, y)
    (grad,) = torch.autograd.grad(a.sum() + 2 * b.sum(), logits)
    expected = torch.full((2, 3), 1.0)  # 3 * p with p = 1/3
    expected[:, 1] -= 3.0
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("name", ["cross_entropy", "squared_error"])
def test_per_target_losses_sum_to_the_summed_loss(name):
    loss = get_loss(name)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g)
    targets = loss.sample_targets(logits, g)
    torch.testing.assert_close(loss.per_target(logits, targets).sum(), loss.summed(logits, targets))


@pytest.mark.parametrize("bad", [[0, 7], [-1, 0]], ids=["above", "negative"])
def test_targets_outside_the_classes_are_a_clear_error(bad):
    from dropsplit.core.losses import get_loss

    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        get_loss("cross_entropy").check(torch.randn(2, 4), torch.tensor(bad))
