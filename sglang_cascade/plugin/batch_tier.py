"""Cascade as SGLang's adaptive-steps policy (the batch tier).

SGLang's EAGLEWorkerV2 pre-builds one runtime state per candidate step count and, before each
decode, asks its policy `get_steps_for_batch(batch_size)`; after each verify it reports the accepted
drafts with `on_verify_complete`. CascadeStepsPolicy REPLACEs the stock EMA policy
(`adaptive_spec_params.AdaptiveSpeculativeParams`) and answers from the Cascade controller; the
AROUND hook on `EAGLEWorkerV2.forward_batch_generation` supplies what the policy interface lacks:
the batch's requests (runtime.begin), so decisions are per request, and whether the batch skips
its draft extend. The AROUND hook on `EAGLEWorkerV2.verify` holds each request to its own budget
within the batch's steps (runtime.prune) and arms the rewrite of cut rows' experts for the target
forward inside it (pruned_experts.py).
"""

from __future__ import annotations

from sglang_cascade.controller import MoEShape

from .flags import PluginSettings
from .pruned_experts import ROUTING
from .runtime import get_runtime, start_runtime


class CascadeStepsPolicy:
    """SGLang's AdaptiveSpecPolicy protocol (adaptive_runtime_state.py), backed by Cascade."""

    def __init__(self, initial_steps: int, cfg_path: str | None = None):
        settings = PluginSettings.from_environ()
        if settings is None:
            raise RuntimeError("sglang-cascade: the Cascade policy was built without --cascade settings")
        self.runtime = start_runtime(settings, initial_steps)
        ROUTING.count_routed = settings.iteration_log is not None
        self._cuda_graph_bs = None

    @property
    def candidate_steps(self) -> list[int]:
        """Every step count the ladder may ask for: SGLang builds one runtime state each."""
        return sorted(self.runtime.captured)

    def set_cuda_graph_bs(self, cuda_graph_bs):
        self._cuda_graph_bs = sorted(cuda_graph_bs) if cuda_graph_bs else None

    def cuda_graph_bs_for_step(self, step: int):
        """Any step may run at any batch size (Cascade has no batch-size slots)."""
        return self._cuda_graph_bs

    def get_steps_for_batch(self, batch_size: int) -> int:
        return self.runtime.steps

    def on_verify_complete(self, num_correct_drafts_per_req, batch_size: int):
        self.runtime.complete(list(num_correct_drafts_per_req))
        return None   # the next get_steps_for_batch switches state; nothing to do now


def forward_batch_generation_hook(original, worker, batch, *args, **kwargs):
    """Open a Cascade iteration for each decode batch, before SGLang picks the batch's steps."""
    runtime = get_runtime()
    mode = batch.forward_mode
    if (runtime is not None and batch.reqs and not (mode.is_extend() or batch.is_extend_in_batch)
            and not mode.is_idle()):
        if runtime.session is None:
            shape, device = _shape(worker)
            runtime.attach(shape, device.type, *_tp_broadcast())
            ROUTING.num_experts = shape.num_experts   # verifies count distinct experts from now on
        runtime.begin(batch.reqs)
        _skip_draft_extend(runtime.skip_draft_extend)
    return original(worker, batch, *args, **kwargs)


def _skip_draft_extend(skip: bool) -> None:
    """SGLang reads SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND from the environment at each steps-0 decode."""
    from sglang.srt.environ import envs

    field = envs.SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND
    if field.get() != skip:
        field.set(skip)


def verify_hook(original, worker, batch, *args, **kwargs):
    runtime = get_runtime()
    if runtime is None or worker.speculative_num_steps == 0 or batch.spec_info is None:
        return original(worker, batch, *args, **kwargs)
    budgets = runtime.prune(batch.spec_info, worker.speculative_num_steps)
    if budgets:
        nxt = batch.spec_info.retrieve_next_token
        ROUTING.arm(budgets, nxt.shape[1], nxt.device)
    try:
        return original(worker, batch, *args, **kwargs)
    finally:
        runtime.record_experts(ROUTING.disarm())


def _shape(worker):
    """(the cost model's view of the target, the device it runs on)"""
    target = worker.target_worker.model_runner.model
    draft = worker.draft_worker.draft_runner.model
    param = next(target.parameters())
    shape = MoEShape.from_config(worker.target_worker.model_config.hf_config,
                                 draft_params=sum(p.numel() for p in draft.parameters()),
                                 bytes_per_param=param.element_size())
    return shape, param.device


def _tp_broadcast():
    """(broadcast, TP rank): broadcast(obj) is TP rank 0's obj on every rank (over SGLang's TP CPU
    group), the identity without TP."""
    from sglang.srt.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return (lambda obj: obj), 0
    return (lambda obj: group.broadcast_object(obj, src=0)), group.rank_in_group
