"""MoEfication: split a dense Llama-style model's FFNs into experts and export a Mixtral checkpoint.

Why: Cascade needs a real MoE target small enough for CPU CI, and no model hub is reachable. So we
take a dense model, group each FFN's neurons into experts by co-activation (MoEfication, Zhang et
al. 2022), train a Mixtral router per layer, and refit the down projections to the routing.

Per layer, on calibration inputs that already went through the MoE layers before it:
1. Cluster the neurons into E equal groups (balanced spherical k-means on binary co-activation).
2. Experts are exact slices: w1 = gate_proj rows, w3 = up_proj rows, w2 = down_proj columns.
   The dense FFN is the *unweighted* sum of all experts, while Mixtral weights the chosen ones by
   renormalised probabilities summing to 1, so every w2 is scaled by top_k: a router giving its
   top-k experts 1/k each then computes exactly "the sum of the chosen experts".
3. Router: soft-target cross-entropy towards the k experts with the largest output (a good discrete
   choice; top-k has no gradient), then least squares on the real top-k MoE output (the weights).
4. Refit the down projections (ridge, closed form) so the chosen experts' activations also predict
   what the unchosen ones would have added. Without it the model was unusable in our runs
   (per-layer relative error ~0.45, held-out code perplexity ~1400 vs 8.7 dense); with it and 2x
   the calibration data, ~0.25 and ~50-60. Static expert groups are the limit: letting every token
   keep its own top 25% of neurons would leave ~0.06-0.10 (measured on layers 3-22).
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
    coact_fraction: float = 0.125  # a neuron is "active" for a token if in its top 1/8 by |activation|
    kmeans_iters: int = 20
    subsample_tokens: int = 4096  # for clustering and the router (9k parameters need no more)
    ce_steps: int = 60  # soft-target cross-entropy: learn *which* experts to pick
    ls_steps: int = 60  # least squares on the real MoE output: learn the weights too
    lr: float = 1e-2
    refit_lambda: float = 0.03  # ridge towards the sliced weights, relative to mean diag(Z^T Z)
    val_fraction: float = 0.125  # trailing calibration tokens held out for the per-layer stats
    seed: int = 0


@dataclass
class MoELayer:
    """One layer's Mixtral MoE block, in the on-disk orientation of Mixtral's w1/w2/w3."""

    gate: torch.Tensor  # (E, hidden) router weight
    w1: torch.Tensor  # (E, m, hidden) rows of gate_proj
    w3: torch.Tensor  # (E, m, hidden) rows of up_proj
    w2: torch.Tensor  # (E, hidden, m) columns of down_proj, times the scale


def balanced_assign(score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment: best (point, cluster) pairs first, each cluster takes `capacity`.

    Exactly `capacity` members per cluster is what makes every expert the same size (Mixtral has
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
        centroids = F.normalize(torch.zeros(k, points.shape[1]).index_add_(0, labels, points), dim=1)
        new = balanced_assign(points @ centroids.T, points.shape[0] // k)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def coactivation_features(h: torch.Tensor, fraction: float) -> torch.Tensor:
    """(neurons, tokens) 0/1 matrix: is the neuron among the token's most active `fraction`?

    Binary co-activation clusters better than raw magnitudes, which a few outlier tokens (attention
    sinks) dominate: top-4 oracle error 0.47 -> 0.37 on layer 15 (measured)."""
    n = max(1, int(h.shape[1] * fraction))
    return torch.zeros_like(h).scatter(1, h.abs().topk(n, dim=1).indices, 1.0).T.contiguous()


def expert_order(labels: torch.Tensor) -> torch.Tensor:
    """Neuron indices grouped expert by expert (stable: each expert keeps the dense order)."""
    return torch.argsort(labels, stable=True)


def slice_experts(mlp: torch.nn.Module, labels: torch.Tensor, n_experts: int, scale: float,
                  down: torch.Tensor | None = None):
    """Expert weights (w1, w3, w2) of a Llama MLP; w2 comes from `down` (default down_proj) * scale."""
    down = mlp.down_proj.weight if down is None else down
    perm = expert_order(labels)
    m = perm.numel() // n_experts
    w1 = mlp.gate_proj.weight[perm].reshape(n_experts, m, -1)
    w3 = mlp.up_proj.weight[perm].reshape(n_experts, m, -1)
    w2 = (down[:, perm] * scale).reshape(-1, n_experts, m).transpose(0, 1)
    return w1.detach().clone(), w3.detach().clone(), w2.detach().contiguous()


def route(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral routing as dense (N, E) weights: softmax, top-k, renormalised over the top-k."""
    probs = logits.float().softmax(dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, idx, top / top.sum(dim=-1, keepdim=True))


def moe_error(coef: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-token relative squared error ||sum_e coef_e Y_e||^2 / ||sum_e Y_e||^2 via Gram matrices.

    `coef` is (MoE weight of an expert) - 1, so the numerator is the MoE-minus-dense residual;
    working on the (N, E, E) Gram instead of (N, E, hidden) outputs makes a step ~36x cheaper."""
    num = (torch.bmm(coef.unsqueeze(1), gram).squeeze(1) * coef).sum(-1)
    return num / gram.sum(dim=(1, 2)).clamp_min(1e-12)


def train_router(x: torch.Tensor, gram: torch.Tensor, cfg: MoEfyConfig) -> torch.Tensor:
    """Router weight (E, hidden) for FFN inputs x (N, hidden) and expert-output Grams (N, E, E).

    Cross-entropy first (targets 1/k on the k experts with the largest output norm), then the real
    per-token relative MoE error through the renormalised weights; both halves measured to help."""
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


def refit_down(z: torch.Tensor, target: torch.Tensor, down: torch.Tensor, lam: float,
               active: torch.Tensor) -> torch.Tensor:
    """Ridge refit of the down projection: argmin_D sum_t ||z_t D^T - y_t||^2 / ||y_t||^2
    + lam' ||D - down||^2, with z the routed activations (each neuron times its expert's weight).

    `active` (N, E) marks the experts whose neuron block of z is non-zero; Z^T Z is built one
    expert block-row at a time from those tokens only, about top_k/E of the dense cost."""
    w = 1.0 / target.norm(dim=1, keepdim=True).clamp_min(1e-6)
    zw, yw = z * w, target * w
    m = z.shape[1] // active.shape[1]
    blocks = [(zw[rows], yw[rows], slice(e * m, (e + 1) * m)) for e, rows in enumerate(active.T)]
    ztz = torch.cat([zr[:, cols].T @ zr for zr, _, cols in blocks])
    zty = torch.cat([zr[:, cols].T @ yr for zr, yr, cols in blocks])
    reg = lam * ztz.diagonal().mean() * torch.eye(ztz.shape[0])
    return torch.linalg.solve(ztz + reg, zty + reg @ down.T).T


def moefy_mlp(mlp: torch.nn.Module, x: torch.Tensor, cfg: MoEfyConfig, seed: int, chunk: int = 4096):
    """MoEfy one dense MLP on its calibration inputs x (N, hidden).

    Returns the layer, the MoE's output on x, and relative errors on the held-out tail of x.
    Clustering and router use a strided subsample of the training tokens (cost, not quality)."""
    e, k = cfg.n_experts, cfg.top_k
    n_train = x.shape[0] - int(x.shape[0] * cfg.val_fraction)
    sub = torch.arange(0, n_train, max(1, n_train // cfg.subsample_tokens))
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (N, neurons)
    labels = balanced_kmeans(coactivation_features(h[sub], cfg.coact_fraction), e, cfg.kmeans_iters, seed)
    perm = expert_order(labels)
    h, down = h[:, perm], mlp.down_proj.weight[:, perm]  # neurons now expert-major
    m = h.shape[1] // e
    dense = h @ down.T

    def expert_outputs(rows):  # (n, E, hidden)
        return torch.einsum("nem,dem->ned", h[rows].reshape(-1, e, m), down.reshape(-1, e, m))

    def gram(rows):  # (n, E, E) inner products of the expert outputs
        return torch.cat([torch.bmm(o, o.transpose(1, 2)) for o in
                          (expert_outputs(rows[i:i + chunk]) for i in range(0, rows.numel(), chunk))])

    gate = train_router(x[sub], gram(sub), cfg)
    coef = k * route(x @ gate.T, k)
    z = h * coef.repeat_interleave(m, dim=1)  # activations times their expert's MoE weight
    active = coef > 0
    new_down = refit_down(z[:n_train], dense[:n_train], down, cfg.refit_lambda, active[:n_train])
    out = torch.zeros_like(dense)  # z @ new_down.T, computed only where z is non-zero
    for j, rows in enumerate(active.T):
        idx, cols = rows.nonzero().flatten(), slice(j * m, (j + 1) * m)
        out.index_add_(0, idx, z[idx, cols] @ new_down[:, cols].T)

    val = torch.arange(n_train, x.shape[0])
    rel = lambda y: ((y - dense[val]).pow(2).sum(-1) / dense[val].pow(2).sum(-1).clamp_min(1e-12)).mean().item()
    oracle = torch.zeros_like(coef[val]).scatter(1, torch.diagonal(gram(val), dim1=1, dim2=2).topk(k).indices, 1.0)
    stats = {"val_rel_err": rel(out[val]), "val_rel_err_no_refit": rel(z[val] @ down.T),
             "val_rel_err_oracle_no_refit": rel(torch.einsum("ne,ned->nd", oracle, expert_outputs(val)))}
    w1, w3, w2 = slice_experts(mlp, labels, e, scale=k, down=new_down[:, torch.argsort(perm)])
    return MoELayer(gate=gate, w1=w1, w3=w3, w2=w2), out, stats


def _attention(layer, h, pos_emb):
    normed = layer.input_layernorm(h)
    return h + layer.self_attn(normed, position_embeddings=pos_emb, attention_mask=None)[0]


@torch.no_grad()
def moefy(model, input_ids: torch.Tensor, cfg: MoEfyConfig, progress: bool = True):
    """MoEfy every layer of a Llama-style causal LM, layer by layer on calibration sequences
    (full length, no padding: attention is plain causal).

    Layer i is calibrated on inputs that went through MoE layers 0..i-1, so the later routers and
    refits see (and partly absorb) the earlier layers' errors. Returns (layers, per-layer stats)."""
    base = model.model
    h = base.embed_tokens(input_ids)
    pos_emb = base.rotary_emb(h, torch.arange(input_ids.shape[1])[None])
    layers, stats = [], []
    for i, layer in enumerate(tqdm(base.layers, desc="MoEfying layers", disable=not progress)):
        mid = _attention(layer, h, pos_emb)
        x = layer.post_attention_layernorm(mid)
        moe, out, st = moefy_mlp(layer.mlp, x.reshape(-1, x.shape[-1]), cfg, cfg.seed + i)
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
