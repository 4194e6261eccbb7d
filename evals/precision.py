"""How sure a throughput ratio is: paired, stratified bootstrap intervals and the goals' verdicts.

Why this shape. A machine's speed drifts by tens of percent over minutes (a plain server measured
12.9 and then 16.8 tokens/s twenty minutes apart), so only ratios taken within one round survive, and
rounds are mirrored (modes in order ABC..., then ...CBA) so that a linear drift biases the rounds'
ratios in opposite directions and their median (= mean for two rounds) cancels it. Within a round
the modes serve the same requests, so a request is its own control: resampling requests, the same
ones for every mode, leaves out the prompt-to-prompt spread that is common to all modes and keeps
the spread of the speed-up itself. Resampling is stratified by round (each round keeps its own
requests) because the rounds are the design, not a sample of it.

A mode's speed in a round is its tokens over its requests' seconds (the sum of latencies; under a
closed loop at concurrency c the wall time is about that sum over c, so the ratio is the throughput
ratio). Only numpy; every interval is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
DRAWS = 2000
RESOLUTION = 0.03  # an interval reaching further than +-3% of its estimate cannot judge a 3% goal
MIN_REQUESTS = 8   # per round: a bootstrap over fewer requests understates the spread, so it never resolves


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    per_round: tuple[float, ...]  # each round's own ratio, against the baseline the estimate is taken on
    baseline: int = 0  # which baseline that is (the oracle's pick)
    requests: int = MIN_REQUESTS  # the fewest paired requests of any round

    @property
    def resolved(self) -> bool:
        return (self.requests >= MIN_REQUESTS
                and max(self.estimate - self.low, self.high - self.estimate) <= RESOLUTION * self.estimate)

    def verdict(self, goal: float) -> str:
        """'met' only where the interval's lower end clears the goal; 'unresolved' where the interval
        is wider than +-3%, whatever it straddles, or rests on too few requests."""
        if not self.resolved:
            return "unresolved"
        return "met" if self.low >= goal else "missed"


Round = dict[str, tuple[int, float]]  # request id -> (output tokens, seconds)


def ratio(mode: list[Round], baselines: list[list[Round]], *, level: float = LEVEL, draws: int = DRAWS,
          seed: int = 0) -> Interval:
    """`mode`'s speed over the best of `baselines` (one baseline: a plain ratio; plain and every static:
    the ratio to the oracle), each a list of rounds. Per baseline the median over rounds of the
    round's ratio; then the lowest over baselines. Requests are paired by id; a request missing from
    any mode in a round is left out of that round."""
    if not baselines or any(len(b) != len(mode) for b in baselines) or not mode:
        raise ValueError("mode and every baseline need the same, non-zero number of rounds")
    rng = np.random.default_rng(seed)
    point, boot, fewest = [], [], None
    for r, mine in enumerate(mode):
        rids = sorted(set(mine).intersection(*(b[r] for b in baselines)))
        if not rids:
            raise ValueError(f"round {r}: no request served by the mode and every baseline")
        fewest = len(rids) if fewest is None else min(fewest, len(rids))
        # (1 + baselines, requests, 2): tokens and seconds per request
        data = np.array([[mine[i] for i in rids], *([b[r][i] for i in rids] for b in baselines)], dtype=float)
        picks = rng.integers(0, len(rids), size=(draws, len(rids)))
        tokens, seconds = data[:, :, 0], data[:, :, 1]
        speed = tokens.sum(1) / seconds.sum(1)                                  # (1 + baselines,)
        drawn = tokens[:, picks].sum(2) / seconds[:, picks].sum(2)              # (1 + baselines, draws)
        point.append(speed[0] / speed[1:])
        boot.append(drawn[0] / drawn[1:])
    point = np.stack(point)                                                     # (rounds, baselines)
    worst = int(np.median(point, axis=0).argmin())
    stats = np.median(np.stack(boot), axis=0).min(axis=0)                       # (draws,)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(np.median(point[:, worst])), float(low), float(high), tuple(map(float, point[:, worst])),
                    worst, fewest)


def spread(values: list[float]) -> dict:
    """Median, 10th and 90th percentile (the report's output-length distribution)."""
    if not values:
        return {"median": None, "p10": None, "p90": None}
    p10, med, p90 = np.percentile(np.asarray(values, dtype=float), [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90)}
