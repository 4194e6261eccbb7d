"""EAGLE3 aux-hidden-state capture for SGLang 0.5.23's Mixtral, which lacks it.

SGLang refuses EAGLE3 on a target without `set_eagle3_layers_to_capture`. Two subclasses add it
while reusing SGLang's forward code:

- MixtralModel gains `set_eagle3_layers_to_capture(layers)`: the attention boundary of each
  listed layer is given a collector (`capture_gathered`, as qwen2_moe.py passes it), so the layer's
  input residual stream - the previous layer's output - is captured; the model then returns
  (hidden, aux) as SGLang's runners expect of a capturing model.
- MixtralForCausalLM gains the EAGLE3 entry point with SGLang's convention (id k in the head's
  eagle_aux_hidden_state_layer_ids means "output of layer k", so layer k + 1's input is captured;
  no ids -> layers 2, n//2, n-3 as llama.py), hands aux to the logits processor, and exposes
  `get_embed_and_head` so the draft can share the target's embedding.

install_mixtral_eagle3() puts both in SGLang's mixtral module (its MixtralForCausalLM builds the
module's MixtralModel) and its EntryClass, which SGLang's model registry reads when it is first
built; the causal-LM class keeps SGLang's class name because the registry keys classes by __name__.
"""

from __future__ import annotations

import sys

import torch
from sglang.srt.layers.aux_hidden_states import AuxHiddenStateList
from sglang.srt.models import mixtral as _sgl


class CapturingMixtralModel(_sgl.MixtralModel):
    """SGLang's MixtralModel plus the aux capture EAGLE3 needs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers_to_capture: list[int] = []
        self._aux = None   # collector of the forward in flight

    def set_eagle3_layers_to_capture(self, layers_to_capture: list[int]) -> None:
        """Capture the input of each listed layer (its predecessor's output)."""
        n = len(self.layers)
        bad = [i for i in layers_to_capture if not 0 <= i < n]
        if bad:
            raise ValueError(f"EAGLE3 capture layers {bad} outside the target's {n} layers: the head's "
                             f"eagle_aux_hidden_state_layer_ids must lie in [-1, {n - 2}]")
        if len(set(layers_to_capture)) != len(layers_to_capture):
            raise ValueError(f"EAGLE3 capture layers {layers_to_capture} repeat a layer: SGLang captures each layer "
                             f"once, so the head's fc would get fewer features than it was trained on; use a head "
                             f"whose eagle_aux_hidden_state_layer_ids are distinct")
        self.layers_to_capture = list(layers_to_capture)
        for i in self.layers_to_capture:
            boundary = self.layers[i].attn_boundary
            boundary.prepare = self._capturing(boundary.prepare)

    def _capturing(self, prepare):
        def prepare_and_capture(hidden_states, forward_batch, **call):
            return prepare(hidden_states, forward_batch, capture_gathered=self._aux, **call)
        return prepare_and_capture

    def forward(self, *args, **kwargs):
        if not self.layers_to_capture:
            return super().forward(*args, **kwargs)
        self._aux = AuxHiddenStateList()
        try:
            hidden_states = super().forward(*args, **kwargs)
        finally:
            aux, self._aux = self._aux, None
        if not self.pp_group.is_last_rank or not aux:
            return hidden_states
        return hidden_states, aux


class MixtralForCausalLM(_sgl.MixtralForCausalLM):
    """SGLang's MixtralForCausalLM with EAGLE3 support (its model is a CapturingMixtralModel)."""

    capture_aux_hidden_states = False

    def get_embed_and_head(self):
        """EAGLE drafts share the target's token embedding (and, for some heads, its LM head)."""
        return self.model.embed_tokens.weight, self.lm_head.weight

    def set_eagle3_layers_to_capture(self, layer_ids: list[int] | None = None) -> None:
        if not self.pp_group.is_last_rank:
            return
        n = self.config.num_hidden_layers
        layers = [2, n // 2, n - 3] if layer_ids is None else [k + 1 for k in layer_ids]
        self.model.set_eagle3_layers_to_capture(layers)
        self.capture_aux_hidden_states = True

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        if not self.capture_aux_hidden_states:
            return super().forward(input_ids, positions, forward_batch, input_embeds,
                                   pp_proxy_tensors=pp_proxy_tensors)
        out = self.model(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors=pp_proxy_tensors)
        if not self.pp_group.is_last_rank:
            return out
        hidden_states, aux = out if isinstance(out, tuple) else (out, None)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch, aux)


def install_mixtral_eagle3() -> None:
    _sgl.MixtralModel = CapturingMixtralModel
    _sgl.MixtralForCausalLM = _sgl.EntryClass = MixtralForCausalLM
    registry = sys.modules.get("sglang.srt.models.registry")
    if registry is not None and "MixtralForCausalLM" in registry.ModelRegistry.models:
        registry.ModelRegistry.models["MixtralForCausalLM"] = MixtralForCausalLM
