"""The paper's findings, each decided from a study's measured numbers by a simple rule stated with it.

Margins: GenEval and VQA accuracies are proportions over n images / questions, so two of them are called
different when they differ by more than two standard errors of a difference of proportions,
    margin = 2 * sqrt(p * (1 - p) * 2 / n),  p = the mean of the two,
and "inconclusive" otherwise (with all scores 0 the margin is 0 and nothing is decided). GenEval's overall is
a mean over categories, not over images; using the image count for n is an approximation.

Prompt alignment is decided by GenEval (the paper's measure) where it separates the variants; where it does
not (a small model can score ~0 everywhere), by the CLIP score (image-prompt cosine with the project's CLIP),
whose means count as different beyond 2 * sqrt(se_a^2 + se_b^2), se = std / sqrt(n) over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str  # "yes", "no", "inconclusive" or "not run"
    rule: str
    evidence: str


def proportion_margin(a: float, b: float, n: int) -> float:
    p = (a + b) / 2
    return 2.0 * math.sqrt(max(p * (1 - p), 0.0) * 2.0 / max(n, 1))


def compare(a: float, b: float, n: int) -> int:
    """+1 if a is clearly above b, -1 if clearly below, 0 if within the margin."""
    margin = proportion_margin(a, b, n)
    return 1 if a - b > margin else -1 if b - a > margin else 0


def compare_means(a: float, a_std: float, a_n: int, b: float, b_std: float, b_n: int) -> tuple[int, float]:
    """(+1 / -1 / 0 as in `compare`, the margin) for two means of per-image values."""
    margin = 2.0 * math.sqrt(a_std**2 / max(a_n, 1) + b_std**2 / max(b_n, 1))
    return (1 if a - b > margin else -1 if b - a > margin else 0), margin


def _clip_score_compare(a: list[dict], b: list[dict]) -> tuple[int, str]:
    """Compare the CLIP scores of two variants averaged over the given points (equal counts)."""
    k = len(a)

    def pooled(points: list[dict]) -> tuple[float, float, int]:
        mean = sum(p["clip_score"]["mean"] for p in points) / k
        std = math.sqrt(sum(p["clip_score"]["std"] ** 2 for p in points) / k)
        return mean, std, sum(p["clip_score"]["n"] for p in points)

    (ma, sa, na), (mb, sb, nb) = pooled(a), pooled(b)
    result, margin = compare_means(ma, sa, na, mb, sb, nb)
    return result, f"CLIP score {ma:.4f} vs {mb:.4f} (margin {margin:.4f})"


def _final(variants: dict, name: str) -> dict | None:
    points = variants.get(name, {}).get("points") or []
    return points[-1] if points else None


def prompt_alignment(variants: dict) -> Finding:
    claim = (
        "CLIP + flow matching gives better prompt alignment (GenEval) than VAE + flow matching and CLIP + MSE"
    )
    rule = ("final-point ShapesGenEval overall: yes if clip_fm is above both others by more than the margin, "
            "no if either is above clip_fm by more than it; a pair GenEval cannot separate is decided by the "
            "final-point CLIP score; inconclusive if neither separates a pair")  # fmt: skip
    fm, others = _final(variants, "clip_fm"), {n: _final(variants, n) for n in ("vae_fm", "clip_mse")}
    if fm is None or any(p is None for p in others.values()):
        return Finding(claim, "not run", rule, "needs clip_fm, vae_fm and clip_mse")
    a = fm["geneval"]["overall"]
    n = fm["geneval"]["images"]
    results, evidence = {}, [f"GenEval clip_fm {a:.3f}, n = {n} images each"]
    for name, p in others.items():
        b = p["geneval"]["overall"]
        results[name] = compare(a, b, n)
        text = f"{name}: GenEval {b:.3f} (margin {proportion_margin(a, b, n):.3f})"
        if results[name] == 0:
            results[name], scores = _clip_score_compare([fm], [p])
            text += f", clip_fm vs {name} {scores}"
        evidence.append(text)
    if all(r > 0 for r in results.values()):
        verdict = "yes"
    else:
        verdict = "no" if any(r < 0 for r in results.values()) else "inconclusive"
    return Finding(claim, verdict, rule, "; ".join(evidence))


def mse_diversity(variants: dict) -> Finding:
    claim = "CLIP + MSE collapses sample diversity; flow matching keeps it"
    rule = ("final-point image diversity ratio r = clip_mse / clip_fm: yes if r < 0.5, no if r > 0.8, "
            "else inconclusive")  # fmt: skip
    fm, mse = _final(variants, "clip_fm"), _final(variants, "clip_mse")
    if fm is None or mse is None:
        return Finding(claim, "not run", rule, "needs clip_fm and clip_mse")
    a, b = fm["diversity"]["image"], mse["diversity"]["image"]
    ratio = b / a if a > 0 else math.inf if b > 0 else 1.0
    verdict = "yes" if ratio < 0.5 else "no" if ratio > 0.8 else "inconclusive"
    evidence = (
        f"image diversity clip_fm {a:.4f}, clip_mse {b:.4f} (r = {ratio:.2f}); DiT-output diversity clip_fm "
        f"{fm['diversity']['target']:.4f}, clip_mse {mse['diversity']['target']:.4f} (0 by construction for MSE: "
        "its images vary only through the pixel decoder's noise)"
    )
    return Finding(claim, verdict, rule, evidence)


def clip_efficiency(variants: dict) -> Finding:
    claim = "CLIP's short sequence (64 tokens) trains more efficiently than long VAE latent sequences"
    rule = ("GenEval at equal training time, averaged over all points: yes if clip_fm is above vae_fm by more "
            "than the margin (n = images x points), no if below by more; if GenEval cannot separate them, the "
            "CLIP score averaged over the points decides the same way; else inconclusive")  # fmt: skip
    fm = variants.get("clip_fm", {}).get("points") or []
    vae = variants.get("vae_fm", {}).get("points") or []
    if not fm or not vae:
        return Finding(claim, "not run", rule, "needs clip_fm and vae_fm")
    k = min(len(fm), len(vae))
    a = sum(p["geneval"]["overall"] for p in fm[:k]) / k
    b = sum(p["geneval"]["overall"] for p in vae[:k]) / k
    n = fm[0]["geneval"]["images"] * k
    result = compare(a, b, n)
    scores = ""
    if result == 0:
        result, scores = _clip_score_compare(fm[:k], vae[:k])
        scores = f"; {scores}"
    verdict = {1: "yes", -1: "no", 0: "inconclusive"}[result]
    tokens = (variants["clip_fm"].get("tokens_per_image"), variants["vae_fm"].get("tokens_per_image"))
    evidence = (
        f"mean GenEval over {k} points: clip_fm {a:.3f}, vae_fm {b:.3f} (margin {proportion_margin(a, b, n):.3f}){scores}; "
        f"tokens per image {tokens[0]} vs {tokens[1]}; training samples/s {fm[k - 1]['samples_per_s']:.1f} vs "
        f"{vae[k - 1]['samples_per_s']:.1f}; steps in the budget {fm[k - 1]['step']} vs {vae[k - 1]['step']}"
    )
    return Finding(claim, verdict, rule, evidence)


def sequential_understanding(base: dict, variants: dict) -> Finding:
    claim = "sequential training (backbone frozen) keeps understanding; joint training trades some away"
    rule = ("final-point ShapesVQA: yes if joint is below the sequential model (the frozen stage-1 backbone) by "
            "more than the margin, no if joint is not below it, inconclusive if below within the margin")  # fmt: skip
    joint = _final(variants, "joint")
    if joint is None or "vqa" not in base:
        return Finding(claim, "not run", rule, "needs joint")
    seq, j = base["vqa"], joint["vqa"]["overall"]
    n = joint["vqa"]["n"]
    margin = proportion_margin(seq, j, n)
    verdict = "yes" if seq - j > margin else "no" if j >= seq else "inconclusive"
    fm = _final(variants, "clip_fm")
    check = f"; clip_fm (frozen backbone) measured {fm['vqa']['overall']:.3f}" if fm else ""
    evidence = f"sequential {seq:.3f}, joint {j:.3f} (margin {margin:.3f}, n = {n} questions){check}"
    return Finding(claim, verdict, rule, evidence)


def vae_lowest_frechet(variants: dict) -> Finding:
    claim = "(side note) VAE + flow matching reaches the lowest Frechet distance (paper: lowest FID)"
    rule = ("final-point CLIP-FD (not Inception-FID): yes if vae_fm's is below every other variant's by more "
            "than 10%, no if another's is below vae_fm's by more than 10%, else inconclusive")  # fmt: skip
    finals = {name: _final(variants, name) for name in variants}
    finals = {name: p for name, p in finals.items() if p is not None}
    if "vae_fm" not in finals or len(finals) < 2:
        return Finding(claim, "not run", rule, "needs vae_fm and another variant")
    vae = finals["vae_fm"]["frechet_clip"]
    others = {name: p["frechet_clip"] for name, p in finals.items() if name != "vae_fm"}
    if all(vae < 0.9 * v for v in others.values()):
        verdict = "yes"
    elif any(v < 0.9 * vae for v in others.values()):
        verdict = "no"
    else:
        verdict = "inconclusive"
    evidence = f"vae_fm {vae:.3f}, " + ", ".join(f"{n} {v:.3f}" for n, v in others.items())
    return Finding(claim, verdict, rule, evidence)


def decide_findings(results: dict) -> list[Finding]:
    variants = results.get("variants", {})
    return [
        prompt_alignment(variants),
        mse_diversity(variants),
        clip_efficiency(variants),
        sequential_understanding(results.get("base", {}), variants),
        vae_lowest_frechet(variants),
    ]
