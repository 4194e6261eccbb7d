"""Every hook the plugin installs in SGLang, in one table that registration and the self-check read.

`always`: installed in every SGLang process whatever the flags (the argv hook that recognises
--cascade, and the meta_info hook, inert without the 'cascade' key that only Cascade schedulers
emit). The rest only where --cascade is on, and only once the installed SGLang passed the
signature check. A REPLACE target is a class; the others are AROUND hooks on functions.
"""

from __future__ import annotations

import pkgutil
from typing import NamedTuple


class Hook(NamedTuple):
    target: str           # SGLang's dotted path
    impl: str             # "module:name" of the plugin's replacement or AROUND hook
    kind: str = "AROUND"  # or "REPLACE"
    always: bool = False

    def resolve(self):
        return pkgutil.resolve_name(self.impl)


HOOKS = (
    Hook("sglang.srt.server_args.prepare_server_args", "sglang_cascade.plugin.argv_hook:prepare_server_args_hook",
         always=True),
    Hook("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
         "sglang_cascade.plugin.meta_info:update_request_meta_info_hook", always=True),
    # Cascade as SGLang's adaptive-steps policy, per request (batch_tier.py)
    Hook("sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams",
         "sglang_cascade.plugin.batch_tier:CascadeStepsPolicy", kind="REPLACE"),
    Hook("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.forward_batch_generation",
         "sglang_cascade.plugin.batch_tier:forward_batch_generation_hook"),
    Hook("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.verify", "sglang_cascade.plugin.batch_tier:verify_hook"),
    # cut rows take no experts of their own (pruned_experts.py)
    Hook("sglang.srt.layers.moe.topk.TopK.forward", "sglang_cascade.plugin.pruned_experts:topk_forward_hook"),
    Hook("sglang.srt.speculative.spec_utils._select_top_k_tokens_later",
         "sglang_cascade.plugin.draft_compile:select_top_k_later_hook"),
    # the plain tier's one-token verify runs the decode kernel (one_token_verify.py)
    Hook("sglang.srt.layers.attention.intel_amx_backend.IntelAMXAttnBackend.forward_extend",
         "sglang_cascade.plugin.one_token_verify:forward_extend_hook"),
    Hook("sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class",
         "sglang_cascade.plugin.meta_info:get_output_streamer_class_hook"),
)
