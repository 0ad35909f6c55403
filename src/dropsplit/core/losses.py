r"""Loss families: the value, the output Hessian ``H_out`` and a sampler whose residual has it.

For the Monte-Carlo Gauss-Newton trick (paper Sec. 3.1, "unbiased one-sample estimator") a loss
needs a label distribution :math:`\hat y \sim P(\cdot \mid F)` with
:math:`\mathbb{E}[\nabla_F \ell(F, \hat y) \nabla_F \ell(F, \hat y)^\top] = H_{out}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Loss:
    """Interface of a per-target loss ``ell(F_n, y_n)`` summed or averaged over ``N`` targets."""

    name = "loss"

    def check(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise a clear error when ``logits`` and ``targets`` do not fit this loss."""
        raise NotImplementedError

    def summed(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum over the ``N`` targets of the per-target loss."""
        raise NotImplementedError

    def sample_targets(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw labels from the model's predictive distribution (no gradient through the draw)."""
        raise NotImplementedError

    def per_target(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The ``[N]`` per-target losses."""
        raise NotImplementedError

    def per_target_at(self, logits: torch.Tensor, *targets: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`per_target` at several label sets of the same outputs."""
        return [self.per_target(logits, t) for t in targets]

    def hessian(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-target output Hessian ``H_out`` of shape ``[N, C, C]``."""
        raise NotImplementedError


class CrossEntropy(Loss):
    """Softmax cross-entropy; ``H_out = diag(p) - p p^T`` with ``p = softmax(F)``."""

    name = "cross_entropy"

    def check(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Require ``logits[N, C]`` floating and ``targets[N]`` integer.

        Args:
            logits: Model outputs.
            targets: Class indices.

        Raises:
            TypeError: If the dtypes are wrong.
            ValueError: If the shapes do not match or a target is not in ``[0, C)``.
        """
        if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("forward_fn must return tensors (logits, targets[, aux])")
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape [N, C], got {tuple(logits.shape)}")
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"targets must have shape [N] = [{logits.shape[0]}] to match logits "
                f"{tuple(logits.shape)}, got {tuple(targets.shape)}"
            )
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
        if targets.numel() and targets.device.type == "cpu":  # on a GPU the check would sync
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= logits.shape[1]:
                raise ValueError(
                    f"targets must be class indices in [0, {logits.shape[1]}), got values "
                    f"from {low} to {high}"
                )

    def summed(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over the ``N`` targets."""
        return F.cross_entropy(logits, targets, reduction="sum")

    def sample_targets(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw ``y_n ~ Categorical(softmax(F_n))`` by inverse CDF (one uniform per target).

        Args:
            logits: ``[N, C]`` logits.
            generator: Source of randomness.

        Returns:
            ``[N]`` sampled class indices.
        """
        with torch.no_grad():
            cdf = torch.softmax(logits.detach(), dim=-1).cumsum(dim=-1)
            u = torch.rand(
                (logits.shape[0], 1), generator=generator, device=generator.device, dtype=cdf.dtype
            ).to(cdf.device)
            u = u * cdf[:, -1:]  # guard against a last cumulative value below 1 from rounding
            labels = torch.searchsorted(cdf, u, right=True).squeeze(1)
            return labels.clamp_(max=logits.shape[1] - 1)

    def per_target(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target cross-entropy."""
        return F.cross_entropy(logits, targets, reduction="none")

    def per_target_at(self, logits: torch.Tensor, *targets: torch.Tensor) -> list[torch.Tensor]:
        """Per-target cross-entropies at several label sets, sharing one log-softmax over ``C``.

        The backward forms ``sum_j g_j (p - onehot(y_j))`` in one pass over ``[N, C]`` (once
        differentiable), instead of one ``[N, C]`` gradient per label set.
        """
        return list(_SharedSoftmaxCrossEntropy.apply(logits, *targets))

    def hessian(self, logits: torch.Tensor) -> torch.Tensor:
        """``diag(p) - p p^T`` per target."""
        p = torch.softmax(logits, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


class SquaredError(Loss):
    """Squared error ``0.5 * ||y - F||^2``; ``H_out = I`` and ``y ~ N(F, I)`` samples it."""

    name = "squared_error"

    def check(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Require ``logits[N, D]`` and ``targets[N, D]`` floating.

        Args:
            logits: Model outputs.
            targets: Regression targets.

        Raises:
            TypeError: If the dtypes are wrong.
            ValueError: If the shapes do not match.
        """
        if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("forward_fn must return tensors (outputs, targets[, aux])")
        if logits.dim() != 2:
            raise ValueError(f"outputs must have shape [N, D], got {tuple(logits.shape)}")
        if targets.shape != logits.shape:
            raise ValueError(
                f"targets must have the shape of the outputs {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        if not targets.is_floating_point():
            raise TypeError(f"regression targets must be floating point, got {targets.dtype}")

    def summed(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed ``0.5 * ||y - F||^2``."""
        return 0.5 * (targets - logits).pow(2).sum()

    def per_target(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``0.5 * ||y_n - F_n||^2`` per target."""
        return 0.5 * (targets - logits).pow(2).sum(1)

    def sample_targets(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw ``y ~ N(F, I)``."""
        with torch.no_grad():
            z = torch.randn(
                logits.shape, generator=generator, device=generator.device, dtype=logits.dtype
            )
            return logits.detach() + z.to(logits.device)

    def hessian(self, logits: torch.Tensor) -> torch.Tensor:
        """The identity per target."""
        n, d = logits.shape
        eye = torch.eye(d, dtype=logits.dtype, device=logits.device)
        return eye.expand(n, d, d)


class _SharedSoftmaxCrossEntropy(torch.autograd.Function):
    """Per-target cross-entropy of one ``[N, C]`` logits tensor at several label sets."""

    @staticmethod
    def forward(ctx, logits, *targets):
        log_p = F.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_p, *targets)
        return tuple(-log_p.gather(1, t.unsqueeze(1)).squeeze(1) for t in targets)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        log_p, *targets = ctx.saved_tensors
        total = sum(grads)
        grad = log_p.exp().mul_(total.unsqueeze(1))
        rows = torch.arange(grad.shape[0], device=grad.device)
        for g, t in zip(grads, targets, strict=True):
            grad.index_put_((rows, t), -g, accumulate=True)
        return (grad, *([None] * len(targets)))


LOSSES: dict[str, type[Loss]] = {"cross_entropy": CrossEntropy, "squared_error": SquaredError}


def get_loss(loss: str | Loss) -> Loss:
    """Resolve a loss given by name or instance.

    Args:
        loss: ``"cross_entropy"``, ``"squared_error"`` or a :class:`Loss`.

    Returns:
        A :class:`Loss` instance.

    Raises:
        ValueError: For an unknown name.
        TypeError: For anything else.
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        return LOSSES[loss]()
    raise TypeError(f"loss must be a name or a Loss, got {type(loss).__name__}")
