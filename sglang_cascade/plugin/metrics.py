"""Cascade's Prometheus series, served by SGLang's /metrics next to its sglang:spec_* (--enable-metrics).

SGLang runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set before the
schedulers start), so series created in TP rank 0's scheduler reach the HTTP process's /metrics.
SGLang's own spec_accept_rate assumes a fixed draft count; these count what Cascade ran.
"""

from __future__ import annotations

UTILITY_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0)


class CascadeMetrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.speculating = Gauge(
            "sglang:cascade_speculating_share",
            "Share of the decode batch's requests whose Cascade budget speculates (steps > 0), latest iteration",
            multiprocess_mode="mostrecent")
        self.budget = Gauge(
            "sglang:cascade_mean_budget_steps",
            "Mean draft steps Cascade gave the decode batch's requests (0 = plain decoding), latest iteration",
            multiprocess_mode="mostrecent")
        self.proposed = Counter("sglang:cascade_drafts_proposed",
                                "Draft tokens proposed within each request's own Cascade budget")
        self.accepted = Counter("sglang:cascade_drafts_accepted", "Draft tokens accepted")
        self.utility = Histogram(
            "sglang:cascade_utility",
            "Utility (token gain / verification cost vs plain decoding) of each configuration a finished "
            "request measured; speculation is off where it is below the threshold (default 1)",
            buckets=UTILITY_BUCKETS)

    def iteration(self, budgets: list[int], accepted: list[int]) -> None:
        self.speculating.set(sum(b > 0 for b in budgets) / len(budgets))
        self.budget.set(sum(budgets) / len(budgets))
        self.proposed.inc(sum(budgets))
        self.accepted.inc(sum(accepted))

    def finished(self, utilities: dict) -> None:
        for label, value in utilities.items():
            if label != "plain":   # 1 by definition
                self.utility.observe(value)
