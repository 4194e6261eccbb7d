"""A one-token verify on SGLang's CPU attention backend runs its decode kernel, as plain decoding does.

Cascade's plain tier (steps 0) is still an EAGLE verify: SGLang sends the request's one token
through TARGET_VERIFY, which IntelAMXAttnBackend serves with its extend kernel
(`extend_attention_cpu`), slower than the decode kernel for one query row and numerically
different from plain decoding's. The AROUND hook on `forward_extend` hands such a call to the
backend's own `forward_decode`, with the sequence lengths counting the new token (a verify batch's
`seq_lens` exclude its draft tokens), passed the way SGLang passes a draft step's: through
`draft_decode_metadata`, which is None on the target's backend otherwise. The decode kernel writes
the token's K/V itself, at the same `out_cache_loc` the extend path would have.
"""

from __future__ import annotations


def forward_extend_hook(original, backend, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None):
    spec = forward_batch.spec_info
    if (forward_batch.forward_mode.is_target_verify() and spec is not None and spec.draft_token_num == 1
            and save_kv_cache and k is not None and v is not None and not layer.is_cross_attention
            and backend.draft_decode_metadata is None and not backend.use_sliding_window_kv_pool):
        backend.draft_decode_metadata = (backend.req_to_token_pool.req_to_token, forward_batch.seq_lens + 1,
                                         forward_batch.req_pool_indices)
        try:
            return backend.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks)
        finally:
            backend.draft_decode_metadata = None
    return original(backend, q, k, v, layer, forward_batch, save_kv_cache, sinks)
