"""Engine-agnostic Cascade policy (arXiv 2506.20675): per-request speculation budgets chosen from
measured utility, with a batch-aware MoE cost model. Standard library only: no torch, numpy or sglang.

    ctl = CascadeController(CascadeConfig(), MoECostModel(MoEShape(...)))
    cfgs = ctl.decide(rids)        # each iteration, before drafting
    ctl.observe(IterationRecord(...))   # after it, with what happened

SGLangAdaptivePolicy (adaptive_baseline.py) re-implements SGLang's own adaptive-steps policy behind
the same interface (SpecPolicy, policy.py), as the baseline Cascade is compared with on the same engine.
SpecSession (session.py) is the bookkeeping every engine keeps around a policy.
"""

from .adaptive_baseline import SGLangAdaptivePolicy
from .config import CascadeConfig, format_candidates, parse_candidates
from .controller import CascadeController
from .cost_model import MoECostModel, MoEShape
from .policy import SpecPolicy
from .session import SpecSession
from .state import Phase
from .types import PLAIN, IterationRecord, RequestObservation, SpecConfig

__all__ = ["CascadeConfig", "CascadeController", "IterationRecord", "MoECostModel", "MoEShape", "PLAIN",
           "Phase", "RequestObservation", "SGLangAdaptivePolicy", "SpecConfig", "SpecPolicy", "SpecSession",
           "format_candidates", "parse_candidates"]
