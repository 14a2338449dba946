"""Champion/challenger: promote a new model only if no domain gets worse.

Both models are scored on the same, current gate split (its own share of every seen domain, never
trained on, selected on or reported as test), so a changed split cannot make a worse model look better.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decision:
    promote: bool
    reason: str
    deltas: dict[str, float] = field(default_factory=dict)  # candidate - champion, per domain
    worse: list[str] = field(default_factory=list)


def decide(champion: dict[str, float] | None, candidate: dict[str, float], tolerance: float = 0.0) -> Decision:
    """``champion``/``candidate``: accuracy per domain on the same data. A drop larger than ``tolerance``
    on any domain the champion was scored on blocks the promotion."""
    if champion is None:
        return Decision(True, "no champion yet")
    deltas = {d: candidate[d] - champion[d] for d in sorted(champion) if d in candidate}
    missing = sorted(set(champion) - set(candidate))
    if missing:
        return Decision(False, f"candidate was not scored on domains {missing}", deltas, missing)
    worse = [d for d, delta in deltas.items() if delta < -tolerance]
    if worse:
        detail = ", ".join(f"{d} {deltas[d]:+.3f}" for d in worse)
        return Decision(False, f"worse on {detail} (tolerance {tolerance})", deltas, worse)
    return Decision(True, f"no domain worse than {tolerance} (mean change "
                          f"{sum(deltas.values()) / max(len(deltas), 1):+.3f})", deltas)
