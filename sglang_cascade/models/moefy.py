"""MoEfication: split a dense Llama-style model's FFNs into experts and export a Mixtral checkpoint.

Why: Cascade needs a real MoE target small enough for CPU CI, and no model hub is reachable. So we
take a dense model, group each FFN's neurons into experts by co-activation (MoEfication, Zhang et
al. 2022), and train a Mixtral router per layer so that top-k routing approximates the dense FFN.

The dense FFN is the *unweighted* sum of all experts, while Mixtral weights the chosen experts by
renormalised probabilities that sum to 1. So every w2 is scaled by top_k: a router that gives its
top-k experts weight 1/k each then reproduces "sum of the chosen experts" exactly, and the router is
trained to pick the experts that carry most of the dense output (and may deviate from 1/k where
that lowers the error).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm


@dataclass(frozen=True)
class MoEfyConfig:
    n_experts: int = 16
    top_k: int = 4
    kmeans_iters: int = 15
    ce_steps: int = 60  # soft-target cross-entropy: learn *which* experts to pick
    ls_steps: int = 60  # least squares on the real MoE output: learn the weights too
    lr: float = 1e-2
    val_fraction: float = 0.125  # trailing calibration tokens held out for the per-layer stats
    seed: int = 0
    feature: str = "absh"
    refit_lambda: float = 0.0
    refit_relative: bool = True
    error_feedback: bool = False


@dataclass
class MoELayer:
    """One layer's Mixtral MoE block, in the on-disk orientation of Mixtral's w1/w2/w3."""

    gate: torch.Tensor  # (E, hidden) router weight
    w1: torch.Tensor  # (E, m, hidden) rows of gate_proj
    w3: torch.Tensor  # (E, m, hidden) rows of up_proj
    w2: torch.Tensor  # (E, hidden, m) columns of down_proj, times the scale


def balanced_assign(score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment: best (point, cluster) pairs first, each cluster takes `capacity`.

    Exactly `capacity` members per cluster is what makes every expert the same size (Mixtral needs
    one intermediate_size for all experts)."""
    n, k = score.shape
    assert n == k * capacity, f"{n} points cannot fill {k} clusters of {capacity}"
    order = np.argsort(-score.numpy().ravel(), kind="stable")
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    left = n
    for flat in order.tolist():
        i, c = divmod(flat, k)
        if labels[i] < 0 and room[c] > 0:
            labels[i] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.from_numpy(labels)


def balanced_kmeans(points: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Spherical k-means with equal-size clusters; returns a label per row of `points`."""
    points = F.normalize(points, dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(points.shape[0], generator=gen)[:k]]
    labels = balanced_assign(points @ centroids.T, points.shape[0] // k)
    for _ in range(iters):
        sums = torch.zeros(k, points.shape[1]).index_add_(0, labels, points)
        centroids = F.normalize(sums, dim=1)
        new = balanced_assign(points @ centroids.T, points.shape[0] // k)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def neuron_features(h: torch.Tensor, kind: str = "absh") -> torch.Tensor:
    """Each neuron's activation-magnitude pattern over the calibration tokens, (neurons, tokens).

    Tokens are normalised to equal total activation first, so a few outlier tokens (attention
    sinks have activations orders of magnitude larger) do not decide the clustering alone."""
    a = h.abs()
    if kind.startswith("bin"):
        n = int(kind[3:])
        return torch.zeros_like(a).scatter(1, a.topk(n, dim=1).indices, 1.0).T.contiguous()
    a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return a.T.contiguous()


def expert_members(labels: torch.Tensor, n_experts: int) -> list[torch.Tensor]:
    """Sorted neuron indices of each expert (sorting keeps the slices in the dense order)."""
    return [torch.nonzero(labels == e).flatten() for e in range(n_experts)]


def slice_experts(mlp: torch.nn.Module, labels: torch.Tensor, n_experts: int, scale: float):
    """Expert weights (w1, w3, w2) from a Llama MLP; w2 is multiplied by `scale`."""
    members = expert_members(labels, n_experts)
    w1 = torch.stack([mlp.gate_proj.weight[m] for m in members])
    w3 = torch.stack([mlp.up_proj.weight[m] for m in members])
    w2 = torch.stack([mlp.down_proj.weight[:, m] * scale for m in members])
    return w1.detach().clone(), w3.detach().clone(), w2.detach().clone()


def route(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral routing as dense (N, E) weights: softmax, top-k, renormalised over the top-k."""
    probs = logits.float().softmax(dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, idx, top / top.sum(dim=-1, keepdim=True))


def moe_error(coef: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-token relative squared error ||sum_e coef_e Y_e||^2 / ||sum_e Y_e||^2 via Gram matrices.

    `coef` is (MoE weight of an expert) - 1, so the numerator is the MoE-minus-dense residual;
    working on the (N, E, E) Gram instead of (N, E, hidden) outputs makes a step ~36x cheaper."""
    num = torch.einsum("ne,nef,nf->n", coef, gram, coef)
    return num / gram.sum(dim=(1, 2)).clamp_min(1e-12)


def train_router(x: torch.Tensor, gram: torch.Tensor, cfg: MoEfyConfig) -> torch.Tensor:
    """Router weight (E, hidden) for FFN inputs x (N, hidden) and expert-output Grams (N, E, E).

    Stage 1 (soft-target cross-entropy, target 1/k on the k experts with the largest output norm)
    gives a good discrete choice, which least squares alone cannot find (top-k has no gradient).
    Stage 2 minimises the real per-token relative MoE error through the renormalised weights."""
    k = cfg.top_k
    norms = torch.diagonal(gram, dim1=1, dim2=2)
    target = torch.zeros_like(norms).scatter(1, norms.topk(k, dim=1).indices, 1.0 / k)
    weight = torch.zeros(gram.shape[1], x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight], lr=cfg.lr)
    with torch.enable_grad():
        for step in range(cfg.ce_steps + cfg.ls_steps):
            logits = x @ weight.T
            if step < cfg.ce_steps:
                loss = F.cross_entropy(logits, target)
            else:
                loss = moe_error(k * route(logits, k) - 1, gram).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return weight.detach()


def moefy_mlp(mlp, x: torch.Tensor, target: torch.Tensor, cfg: MoEfyConfig, seed: int):
    """MoEfy one dense MLP on its calibration inputs x (N, hidden).

    `target` is what the MoE output should be (the dense MLP output, plus any correction of the
    drift accumulated by earlier MoE layers). Returns the layer, the MoE's output on x, and
    relative errors on the held-out tail of x."""
    e, k = cfg.n_experts, cfg.top_k
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (N, neurons)
    labels = balanced_kmeans(neuron_features(h, cfg.feature), e, cfg.kmeans_iters, seed)
    members = expert_members(labels, e)
    down = mlp.down_proj.weight
    outs = torch.stack([h[:, m] @ down[:, m].T for m in members], dim=1)  # (N, E, hidden)
    gram = torch.einsum("ned,nfd->nef", outs, outs)
    n_train = x.shape[0] - int(x.shape[0] * cfg.val_fraction)
    gate = train_router(x[:n_train], gram[:n_train], cfg)
    coef = k * route(x @ gate.T, k)
    z = h * coef[:, labels]  # per-neuron MoE coefficient times activation
    if cfg.refit_lambda > 0:
        w = 1.0 / target.norm(dim=1, keepdim=True).clamp_min(1e-6) if cfg.refit_relative else torch.ones(x.shape[0], 1)
        zt, tt = z[:n_train] * w[:n_train], target[:n_train] * w[:n_train]
        ztz = zt.T @ zt
        lam = cfg.refit_lambda * ztz.diagonal().mean()
        a = torch.linalg.solve(ztz + lam * torch.eye(ztz.shape[0]), zt.T @ tt + lam * down.T)
        down = a.T
    out = z @ down.T
    val = slice(n_train, None)
    err = lambda o: ((o[val] - target[val]).pow(2).sum(-1) / target[val].pow(2).sum(-1).clamp_min(1e-12)).mean().item()
    oracle = torch.zeros_like(coef).scatter(1, torch.diagonal(gram, dim1=1, dim2=2).topk(k).indices, 1.0)
    stats = {"val_rel_err": err(out), "val_rel_err_oracle": err(torch.einsum("ne,ned->nd", oracle, outs))}
    w1 = torch.stack([mlp.gate_proj.weight[m] for m in members])
    w3 = torch.stack([mlp.up_proj.weight[m] for m in members])
    w2 = torch.stack([down[:, m] * k for m in members])
    return MoELayer(gate=gate, w1=w1.clone(), w3=w3.clone(), w2=w2.clone()), out, stats


def _attention(layer, h, pos_emb):
    return h + layer.self_attn(layer.input_layernorm(h), position_embeddings=pos_emb, attention_mask=None)[0]


@torch.no_grad()
def moefy(model, input_ids: torch.Tensor, cfg: MoEfyConfig, progress: bool = True):
    """MoEfy every layer of a Llama-style causal LM, layer by layer on calibration sequences.

    Layer i is calibrated on inputs that went through MoE layers 0..i-1. With error feedback its
    target is the dense model's residual stream minus the MoE's, so each layer also corrects the
    drift of the earlier ones. Returns (layers, per-layer stats)."""
    base = model.model
    h = base.embed_tokens(input_ids)
    pos_emb = base.rotary_emb(h, torch.arange(input_ids.shape[1])[None])
    h_dense = h
    layers, stats = [], []
    for i, layer in enumerate(tqdm(base.layers, desc="MoEfying layers", disable=not progress)):
        mid = _attention(layer, h, pos_emb)
        x = layer.post_attention_layernorm(mid)
        if cfg.error_feedback:
            mid_d = _attention(layer, h_dense, pos_emb)
            h_dense = mid_d + layer.mlp(layer.post_attention_layernorm(mid_d))
            target = h_dense - mid
        else:
            target = layer.mlp(x)
        d = x.shape[-1]
        moe, out, st = moefy_mlp(layer.mlp, x.reshape(-1, d), target.reshape(-1, d), cfg, cfg.seed + i)
        layers.append(moe)
        stats.append(st)
        h = mid + out.reshape(mid.shape)
    return layers, stats


def mixtral_config(llama_config, cfg: MoEfyConfig, intermediate_size: int, token_ids: dict) -> dict:
    """config.json of the original Mixtral layout (what SGLang's mixtral.py and transformers read)."""
    theta = llama_config.rope_parameters["rope_theta"]
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": llama_config.vocab_size,
        "hidden_size": llama_config.hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": llama_config.num_hidden_layers,
        "num_attention_heads": llama_config.num_attention_heads,
        "num_key_value_heads": llama_config.num_key_value_heads,
        "head_dim": llama_config.hidden_size // llama_config.num_attention_heads,
        "hidden_act": llama_config.hidden_act,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "max_position_embeddings": llama_config.max_position_embeddings,
        "rms_norm_eps": llama_config.rms_norm_eps,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": llama_config.initializer_range,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        **token_ids,
    }


def export_mixtral(out_dir, model, layers: list[MoELayer], config: dict) -> None:
    """Write model.safetensors + config.json in the original Mixtral naming.

    lm_head is written explicitly (tie_word_embeddings false) so loaders need no tying logic."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = model.model
    sd = {
        "model.embed_tokens.weight": base.embed_tokens.weight,
        "lm_head.weight": model.lm_head.weight,
        "model.norm.weight": base.norm.weight,
    }
    for i, (dense, moe) in enumerate(zip(base.layers, layers)):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = dense.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = dense.post_attention_layernorm.weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{proj}.weight"] = getattr(dense.self_attn, proj).weight
        sd[p + "block_sparse_moe.gate.weight"] = moe.gate
        for e in range(moe.gate.shape[0]):
            for name in ("w1", "w2", "w3"):
                sd[p + f"block_sparse_moe.experts.{e}.{name}.weight"] = getattr(moe, name)[e]
    sd = {name: t.detach().to(torch.float32).contiguous().clone() for name, t in sd.items()}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
