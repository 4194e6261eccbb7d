"""Engine configuration, its command-line flags, and the request/response values of the engine API."""

from __future__ import annotations

import argparse
import pathlib
from dataclasses import dataclass, field

import torch

from sglang_cascade.controller import CascadeConfig, SGLangAdaptivePolicy, SpecConfig
from sglang_cascade.controller.adaptive_baseline import load_adaptive_config
from sglang_cascade.engine.acceptance import SamplingParams
from sglang_cascade.engine.tree_attention import ATTENTION_BACKENDS

MODES = ("cascade", "adaptive", "static", "plain")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _spec_config(text: str) -> SpecConfig:
    """argparse type: keeps SpecConfig's message (argparse hides a plain ValueError's)."""
    try:
        return SpecConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_target_folder(path: str) -> None:
    """--model-path must be a local model folder: no model hub is reachable here, and transformers reads
    anything else as a hub repo id and fails with a traceback about repo ids."""
    folder = pathlib.Path(path)
    problem = ("no such folder" if not folder.exists() else "not a folder" if not folder.is_dir()
               else "no config.json in it" if not (folder / "config.json").is_file()
               else "no *.safetensors weights in it" if not any(folder.glob("*.safetensors")) else None)
    if problem:
        raise ValueError(f"--model-path {path}: {problem}. Pass a folder with a transformers model's config.json "
                         f"and *.safetensors weights, or leave --model-path out for the embedded default MoE")


def check_draft_head(folder) -> None:
    """The one message for a missing EAGLE-3 head: checked with the flags (before the target loads)
    and again by the engine's load_head (the default head, or a folder removed since)."""
    if not (pathlib.Path(folder) / "config.json").is_file():
        raise ValueError(f"no EAGLE-3 draft head at {folder} (config.json missing); pass "
                         f"--draft-model-path DIR, rebuild the default with the command in "
                         f"sglang_cascade/drafters/checkpoints/default/README.md, or use --mode plain")


@dataclass
class EngineConfig:
    """target_path None = the embedded default MoE (built on first use); draft_path None = the repo's
    default EAGLE-3 head. mode: cascade (the controller picks each request's configuration every
    iteration), adaptive (SGLang's own adaptive-steps policy, SGLangAdaptivePolicy: one chain length
    per batch, from adaptive_initial_steps and the adaptive_config JSON file, None = SGLang's
    defaults), static (every request runs static_config), plain (no drafter at all)."""

    target_path: str | None = None
    draft_path: str | None = None
    mode: str = "cascade"
    static_config: SpecConfig | None = None
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    adaptive_initial_steps: int = 3
    adaptive_config: str | None = None
    max_batch: int = 8
    max_context: int = 2048
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    attention_backend: str = "auto"
    strict_target_hash: bool = False   # refuse a head trained on another target (else warn)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.mode == "static" and (self.static_config is None or not self.static_config.speculative):
            raise ValueError("--mode static needs --static-config STEPSxTOPKxTOKENS with steps >= 1, "
                             "e.g. --static-config 3x1x4 (use --mode plain for no speculation)")
        self._adaptive_settings = None
        if self.mode == "adaptive":
            self._adaptive_settings = self._load_adaptive()
        if self.max_batch < 1:
            raise ValueError(f"--max-running-requests must be >= 1 (got {self.max_batch})")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {self.threads})")
        if self.max_context < 16:
            raise ValueError(f"--context-length must be >= 16 (got {self.max_context})")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)} "
                             f"(got {self.attention_backend!r})")
        self.torch_device()   # a device that does not exist here fails now, before any model loads
        if self.target_path is not None:
            check_target_folder(self.target_path)
        if self.draft_path is not None and self.mode != "plain":
            check_draft_head(self.draft_path)

    def torch_device(self) -> torch.device:
        """The device to run on; a clear error where it does not exist here."""
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"--device {self.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                             f"use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device}: the engine runs on cpu or cuda")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """auto: float32 on the CPU (the batch-invariant path), bfloat16 on a GPU (FlashInfer's)."""
        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)

    def max_tree(self) -> int:
        """Most tree nodes a request can verify in one iteration under this configuration."""
        if self.mode == "plain":
            return 1
        if self.mode == "static":
            return self.static_config.draft_tokens
        if self.mode == "adaptive":
            return self.adaptive_policy().max_steps + 1
        return max(c.draft_tokens for c in self.cascade.ladder)

    def _load_adaptive(self) -> dict | None:
        """The adaptive config (None = SGLang's defaults), checked together with the initial steps."""
        settings = None
        if self.adaptive_config is not None:
            try:
                settings = load_adaptive_config(self.adaptive_config)
            except ValueError as e:
                raise ValueError(f"--adaptive-config {self.adaptive_config}: {e}. Pass a JSON file in SGLang's "
                                 f"--speculative-adaptive-config format, or leave the flag out for SGLang's "
                                 f"defaults") from None
        try:
            SGLangAdaptivePolicy(self.adaptive_initial_steps, settings)
        except ValueError as e:
            raise ValueError(f"--adaptive-initial-steps {self.adaptive_initial_steps}: {e}") from None
        return settings

    def adaptive_policy(self) -> SGLangAdaptivePolicy:
        """A fresh policy for --mode adaptive."""
        if getattr(self, "_adaptive_settings", None) is None and self.adaptive_config is not None:
            self._adaptive_settings = self._load_adaptive()
        return SGLangAdaptivePolicy(self.adaptive_initial_steps, self._adaptive_settings)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("engine")
        g.add_argument("--model-path", default=None,
                       help="target MoE (transformers Mixtral-class folder); default: the embedded default MoE")
        g.add_argument("--draft-model-path", default=None,
                       help="EAGLE-3 head folder (SGLang layout); default: sglang_cascade/drafters/checkpoints/default")
        g.add_argument("--mode", default="cascade", choices=MODES, help="speculation policy (default: cascade)")
        g.add_argument("--static-config", default=None, type=_spec_config,
                       help="STEPSxTOPKxTOKENS for --mode static, e.g. 3x1x4")
        g.add_argument("--adaptive-initial-steps", type=int, default=3, metavar="N",
                       help="--mode adaptive: draft steps every batch-size slot starts at (one of the "
                            "config's candidate steps; a slot without it starts at its middle one; default 3)")
        g.add_argument("--adaptive-config", default=None, metavar="FILE",
                       help="--mode adaptive: JSON in SGLang's --speculative-adaptive-config format "
                            "(batch-size keys with candidate_steps, hysteresis, ceiling_coeff; ema_alpha, "
                            "update_interval, warmup_batches); default: SGLang 0.5.23's defaults")
        g.add_argument("--max-running-requests", type=int, default=8, help="continuous-batching width")
        g.add_argument("--context-length", type=int, default=2048, help="max prompt + output tokens")
        g.add_argument("--seed", type=int, default=0, help="seed of requests that give none")
        g.add_argument("--device", default="cpu",
                       help="cpu, cuda or cuda:N: where the target and head run (default cpu)")
        g.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="target weights' dtype; auto: float32 on the CPU (greedy output token-identical "
                            "to plain decoding), bfloat16 on a GPU")
        g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                       help="tree attention of verify passes; auto: FlashInfer's ragged prefill with the "
                            "tree as custom mask on a CUDA device where flashinfer imports, else torch")
        g.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads; decode GEMMs are small, and on a busy CPU OpenMP's "
                            "synchronisation costs more than a second thread saves (default 1)")
        g.add_argument("--strict-target-hash", action="store_true",
                       help="refuse to start when the draft head records that it was trained on another target "
                            "than --model-path (default: warn and serve)")
        CascadeConfig.add_cli_args(parser)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineConfig":
        return cls(target_path=ns.model_path, draft_path=ns.draft_model_path, mode=ns.mode,
                   static_config=ns.static_config, cascade=CascadeConfig.from_cli_args(ns),
                   adaptive_initial_steps=getattr(ns, "adaptive_initial_steps", 3),
                   adaptive_config=getattr(ns, "adaptive_config", None),
                   max_batch=ns.max_running_requests, max_context=ns.context_length, seed=ns.seed,
                   threads=ns.threads, device=ns.device, dtype=ns.dtype,
                   attention_backend=ns.attention_backend, strict_target_hash=ns.strict_target_hash)


@dataclass
class GenerationRequest:
    """input_ids: the prompt; spec: a per-request static configuration that overrides the mode."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spec: SpecConfig | None = None


@dataclass
class StepOutput:
    """New tokens of one request after one iteration; finish_reason as SGLang reports it."""

    rid: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: dict | None
    meta: dict
