"""Start-up self-check: the installed SGLang is the one the hooks were written for, and they took effect.

SGLang logs and swallows plugin and hook failures, so without this a version drift would serve
silently without Cascade. check_installed() (the version, then every hooked signature) runs in the
launcher, before any model loads, and in every scheduler, before its hooks are installed;
check_applied() in every scheduler once they are applied. Another SGLang version is refused even
where the signatures still match (what the hooks rely on is more than signatures), unless the user
accepts the risk with --cascade-allow-untested-sglang.
"""

from __future__ import annotations

import inspect
import pkgutil

from .flags import SUPPORTED_SGLANG
from .hooks import HOOKS

# dotted path -> parameter names the plugin relies on (SGLang 0.5.23)
SIGNATURES = {
    "sglang.srt.server_args.prepare_server_args": ["argv"],
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.forward_batch_generation":
        ["self", "batch", "on_publish", "grammar_barrier", "pp_proxy_tensors"],
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.verify":
        ["self", "batch", "pp_proxy_tensors", "grammar_barrier"],
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.activate_step_by_batch": ["self", "batch_size"],
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2._stub_skipped_draft_extend":
        ["self", "batch", "batch_output"],
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.on_verify_complete_cpu":
        ["self", "num_correct_drafts_per_req", "batch_size"],
    "sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams.__init__":
        ["self", "initial_steps", "cfg_path"],
    "sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams.get_steps_for_batch":
        ["self", "batch_size"],
    "sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams.on_verify_complete":
        ["self", "num_correct_drafts_per_req", "batch_size"],
    "sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams.set_cuda_graph_bs":
        ["self", "cuda_graph_bs"],
    "sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams.cuda_graph_bs_for_step":
        ["self", "step"],
    "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class": ["self"],
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
    ".build_additional_customized_info": ["self", "reqs"],
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
    ".is_request_level_customized_info_key": ["self", "key"],
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info":
        ["self", "meta_info", "state", "customized_info", "index", "finish_reason"],
    "sglang.srt.layers.layer_boundary.stage.StageBoundary.prepare":
        ["self", "hidden_states", "forward_batch", "cache", "call"],
    "sglang.srt.layers.moe.topk.TopK.forward": ["self", "args", "backend", "kwargs"],
    "sglang.srt.speculative.spec_utils._select_top_k_tokens_later":
        ["i", "topk_p", "topk_index", "hidden_states", "scores", "topk"],
    "sglang.srt.layers.attention.intel_amx_backend.IntelAMXAttnBackend.forward_extend":
        ["self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache", "sinks"],
    "sglang.srt.layers.attention.intel_amx_backend.IntelAMXAttnBackend.forward_decode":
        ["self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache", "sinks"],
    "sglang.srt.layers.moe.topk.StandardTopKOutput._replace": ["self", "kwds"],
    "sglang.srt.models.mixtral.MixtralModel.forward":
        ["self", "input_ids", "positions", "forward_batch", "input_embeds", "pp_proxy_tensors"],
    "sglang.srt.models.mixtral.MixtralForCausalLM.forward":
        ["self", "input_ids", "positions", "forward_batch", "input_embeds", "pp_proxy_tensors"],
}

# environment switches of SGLang's the plugin sets per iteration (SGLang reads them at each use)
ENV_SWITCHES = ["SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND"]

def version_problem() -> str | None:
    """None where the installed SGLang is the version the plugin was written for."""
    import sglang

    if sglang.__version__ == SUPPORTED_SGLANG:
        return None
    return (f"this plugin supports SGLang {SUPPORTED_SGLANG}, found {sglang.__version__}: install "
            f"sglang=={SUPPORTED_SGLANG}, or add --cascade-allow-untested-sglang to run it anyway where every hooked "
            f"signature still matches")


def check_installed(allow_untested: bool = False) -> list[str]:
    """Problems with the installed SGLang (empty: the plugin may install its hooks)."""
    version = version_problem()
    return ([version] if version and not allow_untested else []) + check_signatures()


def check_signatures() -> list[str]:
    """Problems found (empty: the hooked functions exist with the expected parameters)."""
    problems = []
    for target, expected in SIGNATURES.items():
        owner, name = target.rsplit(".", 1)
        try:
            fn = getattr(_sglang_class(pkgutil.resolve_name(owner)), name)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{target} is missing ({exc})")
            continue
        found = list(inspect.signature(fn).parameters)
        if found != expected:
            problems.append(f"{target}{tuple(found)} is not {tuple(expected)}")
    from sglang.srt.environ import Envs

    problems += [f"sglang.srt.environ.Envs.{name} is missing" for name in ENV_SWITCHES if not hasattr(Envs, name)]
    return problems


def _sglang_class(owner):
    """SGLang's own class where the plugin already put a subclass in its place (Mixtral)."""
    if isinstance(owner, type) and owner.__module__.startswith("sglang_cascade."):
        return next(c for c in owner.__mro__ if c.__module__.startswith("sglang."))
    return owner


def check_applied() -> list[str]:
    """Problems found in a scheduler after SGLang applied the hooks (empty: all took effect)."""
    from sglang.srt.models import mixtral
    from sglang.srt.speculative import adaptive_spec_params, eagle_worker_v2

    from .batch_tier import CascadeStepsPolicy
    from .mixtral_eagle3 import CapturingMixtralModel, MixtralForCausalLM

    problems = []
    for module in (adaptive_spec_params, eagle_worker_v2):   # the worker binds the class by from-import
        if module.AdaptiveSpeculativeParams is not CascadeStepsPolicy:
            problems.append(f"{module.__name__}.AdaptiveSpeculativeParams was not replaced by the Cascade policy")
    for hook in HOOKS:
        if hook.kind == "AROUND" and not hook.always and not _wrapped_by(pkgutil.resolve_name(hook.target),
                                                                          hook.resolve()):
            problems.append(f"the AROUND hook on {hook.target} did not take effect")
    if mixtral.MixtralModel is not CapturingMixtralModel or mixtral.EntryClass is not MixtralForCausalLM:
        problems.append("SGLang's Mixtral classes were not replaced by the EAGLE3-capturing ones")
    return problems


def _wrapped_by(fn, hook) -> bool:
    """Whether one of the hook registry's wrappers around fn calls `hook`."""
    while fn is not None:
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                if cell.cell_contents is hook:
                    return True
            except ValueError:   # an empty cell
                pass
        fn = getattr(fn, "__wrapped__", None)
    return False
