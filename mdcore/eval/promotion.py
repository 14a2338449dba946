"""Champion/challenger: promote a new model only if no domain gets worse.

Both models are scored on the same, current gate split (its own share of every seen domain, never
trained on, selected on or reported as test), so a changed split cannot make a worse model look better.

Accuracy alone lets a challenger trade one class for the others: a rare class's recall can fall to zero in
a domain while the domain's accuracy holds or rises. With ``max_class_recall_drop`` the gate also compares
each domain's worst-class recall (the lowest recall over its classes, ``mdcore.eval.classwise``) and refuses
a challenger whose worst class fell by more than that.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decision:
    promote: bool
    reason: str
    deltas: dict[str, float] = field(default_factory=dict)  # candidate - champion, per domain
    worse: list[str] = field(default_factory=list)
    recall_deltas: dict[str, float] = field(default_factory=dict)  # worst-class recall, candidate - champion
    worse_class_recall: list[str] = field(default_factory=list)


def decide(champion: dict[str, float] | None, candidate: dict[str, float], tolerance: float = 0.0, *,
           champion_worst_recall: dict[str, float | None] | None = None,
           candidate_worst_recall: dict[str, float | None] | None = None,
           max_class_recall_drop: float | None = None) -> Decision:
    """``champion``/``candidate``: accuracy per domain on the same data. A drop larger than ``tolerance``
    on any domain the champion was scored on blocks the promotion. With ``max_class_recall_drop`` and both
    worst-class recall dicts (per domain, same data), so does a worst-class recall falling by more than it
    in any domain both were scored on (None for either model, or the rule off: accuracy only)."""
    if champion is None:
        return Decision(True, "no champion yet")
    deltas = {d: candidate[d] - champion[d] for d in sorted(champion) if d in candidate}
    missing = sorted(set(champion) - set(candidate))
    if missing:
        return Decision(False, f"candidate was not scored on domains {missing}", deltas, missing)
    recall_deltas, recall_worse = _recall_check(champion_worst_recall, candidate_worst_recall, max_class_recall_drop)
    worse = [d for d, delta in deltas.items() if delta < -tolerance]
    reasons = []
    if worse:
        detail = ", ".join(f"{d} {deltas[d]:+.3f}" for d in worse)
        reasons.append(f"worse on {detail} (tolerance {tolerance})")
    if recall_worse:
        detail = ", ".join(f"{d} {champion_worst_recall[d]:.2f} -> {candidate_worst_recall[d]:.2f}" for d in recall_worse)
        reasons.append(f"worst-class recall fell on {detail} (max_class_recall_drop {max_class_recall_drop})")
    if reasons:
        return Decision(False, "; ".join(reasons), deltas, worse, recall_deltas, recall_worse)
    checked = f"; worst-class recall within {max_class_recall_drop}" if recall_deltas else ""
    return Decision(True, f"no domain worse than {tolerance} (mean change "
                          f"{sum(deltas.values()) / max(len(deltas), 1):+.3f}){checked}", deltas, [], recall_deltas)


def _recall_check(champion: dict | None, candidate: dict | None, max_drop: float | None) -> tuple[dict, list]:
    """(worst-class recall change per domain both models have a figure for, domains that fell too far)."""
    if max_drop is None or champion is None or candidate is None:
        return {}, []
    known = lambda v: v is not None and v == v  # noqa: E731 (None or NaN: a domain with no class figure)
    deltas = {d: candidate[d] - champion[d] for d in sorted(champion) if known(champion[d]) and known(candidate.get(d))}
    return deltas, [d for d, delta in deltas.items() if delta < -max_drop - 1e-9]
