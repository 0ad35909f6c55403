"""See what dropout does to a model: both effects per site, and the shape of the noise.

:func:`measure_effects` works on any model with sites; ``dropsplit measure RUN_DIR`` applies it
to a trained run. Per site it gives the Monte-Carlo explicit gap with its standard error beside
the predicted ``lambda * R`` (exact curvature when ``N * C`` allows, sampled otherwise; both
groupings); for the dropout, difference and analytic gradient noise it gives the covariance
trace, the top eigenvalues (randomized SVD of the draws, the matrix is never formed) and the
alignment of the top eigenvectors between the noises. :func:`noise_scale` puts dropout's noise
on the scale of the noise plain SGD already has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dropsplit.core.explicit import MAX_EXACT_JACOBIAN_ROWS
from dropsplit.core.forward import ForwardFn, call_forward
from dropsplit.core.losses import get_loss
from dropsplit.core.sites import SiteContext, named_sites, site_context
from dropsplit.measure.quantities import (
    GapEstimate,
    explicit_gap,
    explicit_regularizer,
    full_curvature,
    gradient_noise,
    minibatch_noise,
)
from dropsplit.optional import require

KINDS = ("dropout", "difference", "analytic")


def top_eigen(draws: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` eigenvalues and eigenvectors of ``draws^T draws / S`` by randomized SVD.

    Args:
        draws: ``[S, P]`` mean-zero noise draws.
        k: Number of eigenpairs (at most ``S``).
        seed: Seed of the random range finder.

    Returns:
        ``(eigenvalues[k], eigenvectors[P, k])``, largest first.
    """
    k = min(k, draws.shape[0])
    scaled = draws / math.sqrt(draws.shape[0])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(scaled, q=min(k + 5, min(scaled.shape)), niter=4)
    return s[:k] ** 2, v[:, :k]


def subspace_alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||A^T B||_F^2 / k`` for orthonormal ``[P, k]`` bases: 1 same span, ~k/P random."""
    return float((a.T @ b).pow(2).sum() / a.shape[1])


def _n_targets(model, forward_fn, batch, loss) -> tuple[int, int]:
    with torch.no_grad(), site_context(model, SiteContext("off")):
        out = call_forward(forward_fn, model, batch, loss)
    rows, classes = out.logits.shape
    return rows, classes


def _mean_estimate(estimates: Sequence[GapEstimate]) -> tuple[float, float]:
    """Mean of per-batch estimates and its standard error."""
    mean = sum(e.mean for e in estimates) / len(estimates)
    return mean, math.sqrt(sum(e.stderr**2 for e in estimates)) / len(estimates)


def _site_row(
    model: nn.Module,
    forward_fn: ForwardFn,
    batches: Sequence[Any],
    name: str,
    curvature: str,
    samples: dict[str, int],
    seed: int,
    loss: str,
) -> dict[str, float]:
    """One site's measured gap and predictions, averaged over the batches.

    ``samples``: draws of the ``"gap"``, the sampled ``"curvature"`` and the ``"full"`` term
    (0: skipped).
    """
    row: dict[str, float] = {}
    row["gap"], row["gap_stderr"] = _mean_estimate(
        [
            explicit_gap(
                model, forward_fn, b, samples["gap"], sites=[name], seed=seed + i, loss=loss
            )
            for i, b in enumerate(batches)
        ]
    )
    for grouping in ("mask", "element"):
        row[grouping] = sum(
            explicit_regularizer(
                model,
                forward_fn,
                b,
                curvature,
                grouping=grouping,
                samples=samples["curvature"],
                sites=[name],
                seed=seed + i,
                loss=loss,
            )
            for i, b in enumerate(batches)
        ) / len(batches)
    if samples["full"]:
        row["full"], row["full_stderr"] = _mean_estimate(
            [
                full_curvature(
                    model, forward_fn, b, samples["full"], sites=[name], seed=seed + i, loss=loss
                )[name]
                for i, b in enumerate(batches)
            ]
        )
    return row


def _noise_spectra(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    samples: int,
    top: int,
    seed: int,
    loss: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Trace and top eigenvalues of each gradient noise on ``batch``, and their alignments."""
    noise, bases = {}, {}
    for kind in KINDS:
        draws = gradient_noise(model, forward_fn, batch, kind, samples, seed=seed, loss=loss)
        values, vectors = top_eigen(draws, top, seed)
        noise[kind] = {
            "trace": float(draws.pow(2).sum(1).mean()),
            "top_eigenvalues": values.tolist(),
        }
        bases[kind] = vectors
        del draws
    alignment = {
        f"{a}/{b}": subspace_alignment(bases[a], bases[b])
        for i, a in enumerate(KINDS)
        for b in KINDS[i + 1 :]
    }
    return noise, alignment


def measure_effects(
    model: nn.Module,
    forward_fn: ForwardFn,
    batches: Sequence[Any],
    *,
    gap_samples: int = 64,
    curvature_samples: int = 16,
    noise_samples: int = 64,
    full_samples: int = 0,
    top: int = 5,
    seed: int = 0,
    loss: str = "cross_entropy",
    progress: bool = False,
) -> dict[str, Any]:
    """Measure the explicit and implicit effect of every site of ``model``.

    Args:
        model: A model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batches: Batches to average over (the noise uses the first).
        gap_samples: Mask draws per batch and site for the gap.
        curvature_samples: Label draws of the sampled curvature.
        noise_samples: Draws of each gradient noise.
        full_samples: Hutchinson draws per batch and site of the whole second-order term
            (:func:`~dropsplit.measure.quantities.full_curvature`: ``"full"`` and
            ``"full_stderr"`` per site); ``0`` skips it (a double backward per draw).
        top: Number of top eigenvalues.
        seed: Seed of every draw.
        loss: Loss family.
        progress: Show a tqdm bar over sites.

    Returns:
        ``{"curvature": "exact" | "sampled", "sites": {name: {...}}, "total": {...},
        "noise": {kind: {"trace", "top_eigenvalues"}}, "alignment": {"a/b": value}}``.
    """
    loss_fn = get_loss(loss)
    n, c = _n_targets(model, forward_fn, batches[0], loss_fn)
    curvature = "exact" if n * c <= MAX_EXACT_JACOBIAN_ROWS else "sampled"
    names = [name for name, site in named_sites(model) if site.p > 0]
    iterator = names
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(names, desc="sites", disable=None)
        except ImportError:
            pass
    samples = {
        "gap": gap_samples,
        "curvature": curvature_samples,
        "noise": noise_samples,
        "full": full_samples,
    }
    sites = {
        name: _site_row(model, forward_fn, batches, name, curvature, samples, seed, loss)
        for name in iterator
    }
    full = ["full"] if full_samples else []
    total = {key: sum(r[key] for r in sites.values()) for key in ["gap", "mask", "element", *full]}
    for key in ("gap", *full):  # independent errors add in quadrature
        total[f"{key}_stderr"] = math.sqrt(sum(r[f"{key}_stderr"] ** 2 for r in sites.values()))
    noise, alignment = _noise_spectra(model, forward_fn, batches[0], noise_samples, top, seed, loss)
    return {
        "curvature": curvature,
        "sites": sites,
        "total": total,
        "noise": noise,
        "alignment": alignment,
        "samples": samples,
    }


def noise_scale(
    model: nn.Module,
    forward_fn: ForwardFn,
    batches: Sequence[Any],
    *,
    samples: int = 8,
    seed: int = 0,
    loss: str = "cross_entropy",
) -> dict[str, Any]:
    r"""Dropout's gradient noise against the minibatch noise of plain SGD, at one batch size.

    Dropout_k removes part of dropout's noise (its covariance is that of Dropout_1 over ``k``),
    so the implicit effect can matter only where that noise is not small beside the noise SGD
    has anyway. Over ``B`` batches: the minibatch trace
    :math:`\operatorname{tr} \operatorname{Cov}_b[\nabla L_b]` (clean gradients,
    :func:`~dropsplit.measure.quantities.minibatch_noise`) and the mean over the batches of
    the dropout trace :math:`\operatorname{tr} \operatorname{Cov}_\eta[\nabla L_b(\eta)]`
    (``samples`` masks each); their ratio. Standard errors are over the batches (the
    minibatch one approximate: the centred draws are weakly dependent).

    Args:
        model: A model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batches: At least two batches of the training batch size.
        samples: Masks per batch for the dropout trace.
        seed: Seed of the masks (batch ``i`` uses ``seed + i``).
        loss: Loss family.

    Returns:
        ``{"batches", "samples", "minibatch", "minibatch_stderr", "dropout",
        "dropout_stderr", "ratio"}`` (``ratio`` = dropout / minibatch).
    """
    minibatch = minibatch_noise(model, forward_fn, batches, loss=loss).pow(2).sum(1)
    dropout = torch.tensor(
        [
            float(
                gradient_noise(model, forward_fn, b, "dropout", samples, seed=seed + i, loss=loss)
                .pow(2)
                .sum(1)
                .mean()
            )
            for i, b in enumerate(batches)
        ]
    )
    n = len(batches)
    return {
        "batches": n,
        "samples": samples,
        "minibatch": float(minibatch.mean()),
        "minibatch_stderr": float(minibatch.std() / math.sqrt(n)),
        "dropout": float(dropout.mean()),
        "dropout_stderr": float(dropout.std() / math.sqrt(n)),
        "ratio": float(dropout.mean() / minibatch.mean()),
    }


def format_effects(result: dict[str, Any]) -> str:
    """A terminal table of :func:`measure_effects`."""
    lines = [
        f"Explicit effect per site (prediction: {result['curvature']} curvature)",
        f"{'site':<14} {'MC gap':>22} {'lambda R (mask)':>16} {'lambda R (elem)':>16} "
        f"{'gap/mask':>9}",
    ]
    full = "full" in result["total"]
    if full:
        lines[1] += f" {'full (Hutchinson)':>22} {'gap/full':>9}"
    rows = {**result["sites"], "total": result["total"]}
    for name, r in rows.items():
        gap = f"{r['gap']:.4e} +- {r['gap_stderr']:.1e}"
        ratio = r["gap"] / r["mask"] if r["mask"] else float("nan")
        line = f"{name:<14} {gap:>22} {r['mask']:>16.4e} {r['element']:>16.4e} {ratio:>9.3f}"
        if full:
            estimate = f"{r['full']:.4e} +- {r['full_stderr']:.1e}"
            line += f" {estimate:>22} {r['gap'] / r['full'] if r['full'] else float('nan'):>9.3f}"
        lines.append(line)
    lines.append("")
    lines.append(f"Gradient noise ({result['samples']['noise']} draws each)")
    dropout_trace = result["noise"]["dropout"]["trace"]
    for kind, r in result["noise"].items():
        eig = ", ".join(f"{v:.3g}" for v in r["top_eigenvalues"])
        lines.append(
            f"{kind:<11} trace {r['trace']:.4e} ({r['trace'] / dropout_trace:.3f} of dropout)"
            f"  top eigenvalues [{eig}]"
        )
    align = ", ".join(f"{k} {v:.3f}" for k, v in result["alignment"].items())
    lines.append(f"top-eigenvector alignment (1 = same subspace): {align}")
    return "\n".join(lines)


def plot_effects(result: dict[str, Any], out_dir) -> list[str]:
    """PNG figures: gap vs prediction per site, and the noise spectra. Returns the paths.

    ``out_dir`` is created (with its parents) when it does not exist.
    """
    require("matplotlib", "plot_effects").use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(result["sites"])
    rows = [result["sites"][n] for n in names]
    x = torch.arange(len(names)).numpy()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 3.5))
    ax.bar(
        x - 0.27,
        [r["gap"] for r in rows],
        0.27,
        yerr=[2 * r["gap_stderr"] for r in rows],
        label="Monte-Carlo gap (2 s.e.)",
        color="0.3",
    )
    ax.bar(x, [r["mask"] for r in rows], 0.27, label="lambda R, mask grouping", color="C0")
    ax.bar(x + 0.27, [r["element"] for r in rows], 0.27, label="lambda R, per element", color="C1")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("loss units")
    ax.set_title("Explicit effect of dropout per site: measured vs predicted")
    ax.legend(fontsize=8)
    fig.tight_layout()
    gap_path = out / "gap_vs_prediction.png"
    fig.savefig(gap_path, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, r in result["noise"].items():
        ax.semilogy(
            range(1, len(r["top_eigenvalues"]) + 1),
            r["top_eigenvalues"],
            "o-",
            label=f"{kind} (trace {r['trace']:.3g})",
        )
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue of the noise covariance")
    ax.set_title("Gradient-noise spectra")
    ax.legend(fontsize=8)
    fig.tight_layout()
    spectrum_path = out / "noise_spectra.png"
    fig.savefig(spectrum_path, dpi=120)
    plt.close(fig)
    return [str(gap_path), str(spectrum_path)]
