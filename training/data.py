"""Offline prompts per workload and the target's greedy answers to them (self-distillation).

Why self-distillation: a draft head is judged by how often it guesses the target's own greedy tokens,
so the target's answers are the right training text, and no corpus or hub has to be reachable. The
prompts are generated from templates with a fixed seed, so the same config rebuilds the same data.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os.path
import pathlib
import random
import shlex
import string
import textwrap

import torch
from tqdm.auto import tqdm

WORKLOADS = ("code", "math", "extraction", "chat")


def _code_prompts(rng: random.Random, n: int) -> list[str]:
    """Half function-writing requests, half 'complete this stdlib function from its docstring'."""
    tasks = [
        "reverses the words in a sentence", "checks whether a number is prime", "merges two sorted lists",
        "counts how often each word occurs in a text", "returns the n-th Fibonacci number",
        "flattens a nested list", "removes duplicate items while keeping their order",
        "converts a temperature from Celsius to Fahrenheit", "finds the longest common prefix of a list of strings",
        "checks whether two strings are anagrams", "computes the greatest common divisor of two integers",
        "parses a date string in YYYY-MM-DD format", "validates an email address with a regular expression",
        "splits a list into chunks of size k", "returns the median of a list of numbers",
        "transposes a matrix given as a list of lists", "computes the factorial of n recursively",
        "reads a text file and returns its non-empty lines", "groups a list of dictionaries by a key",
        "converts a Roman numeral to an integer", "implements binary search on a sorted list",
        "rotates a list by k positions", "checks whether brackets in a string are balanced",
        "returns the running sum of a list", "capitalizes the first letter of every word",
    ]
    langs = ["Python", "Python", "Python", "JavaScript", "Go", "Rust"]
    styles = ["", " Include a docstring.", " Add type hints.", " Keep it short.", " Explain it briefly."]
    funcs = sorted({(m.__name__, name): f for m in (json, os.path, shlex, string, textwrap)
                    for name, f in vars(m).items()
                    if inspect.isfunction(f) and not name.startswith("_") and inspect.getdoc(f)}.items())
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(f"Write a {rng.choice(langs)} function that {rng.choice(tasks)}.{rng.choice(styles)}")
        else:
            (mod, name), f = funcs[rng.randrange(len(funcs))]
            doc = inspect.getdoc(f).split("\n\n")[0]
            sig = str(inspect.signature(f))
            out.append(f"Complete this Python function:\n\ndef {name}{sig}:\n    \"\"\"{doc}\"\"\"\n")
    return out


def _math_prompts(rng: random.Random, n: int) -> list[str]:
    """GSM-style word problems with random numbers."""
    names = ["Ana", "Ben", "Chen", "Dora", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia"]
    items = ["apples", "books", "marbles", "stickers", "cookies", "pencils", "cards", "shells"]
    templates = [
        "{a} has {x} {it}. {b} gives {a} {y} more, and then {a} gives away {z}. How many {it} does {a} have now?",
        "A box holds {x} {it}. How many {it} are in {y} boxes?",
        "{a} buys {x} {it} at ${p} each and pays with a ${m} bill. How much change does {a} get?",
        "{a} reads {x} pages a day. How many days does it take to read a book of {big} pages?",
        "A train travels at {x} km per hour for {y} hours. How far does it go?",
        "{a} saves ${x} every week. How many weeks until {a} has ${big}?",
        "{a} and {b} share {big} {it} in the ratio {y}:{z}. How many {it} does {b} get?",
        "A shop sells {it} for ${p} each. On sale they are {pct}% off. What do {x} {it} cost on sale?",
        "{a} is {x} years old. {b} is {y} years older than twice {a}'s age. How old is {b}?",
        "A rectangle is {x} m long and {y} m wide. What are its area and perimeter?",
    ]
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        out.append(rng.choice(templates).format(
            a=a, b=b, it=rng.choice(items), x=rng.randint(3, 60), y=rng.randint(2, 12), z=rng.randint(1, 5),
            p=rng.randint(2, 15), m=rng.choice([50, 100]), big=rng.randint(100, 900), pct=rng.choice([10, 20, 25, 50])))
    return out


def _extraction_prompts(rng: random.Random, n: int) -> list[str]:
    """'Extract as JSON' over synthetic records written as prose."""
    first = ["Maria", "John", "Aiko", "Carlos", "Priya", "Lukas", "Sofia", "Omar", "Elena", "Tom"]
    last = ["Silva", "Smith", "Tanaka", "Garcia", "Patel", "Weber", "Rossi", "Haddad", "Ivanova", "Brown"]
    cities = ["Lisbon", "Boston", "Osaka", "Madrid", "Pune", "Berlin", "Milan", "Cairo", "Kyiv", "Leeds"]
    products = ["laptop", "desk lamp", "coffee grinder", "bike helmet", "backpack", "monitor", "kettle"]
    out = []
    for _ in range(n):
        f, l, c = rng.choice(first), rng.choice(last), rng.choice(cities)
        age, qty, price = rng.randint(19, 80), rng.randint(1, 9), rng.randint(5, 900)
        day, month = rng.randint(1, 28), rng.choice(["March", "June", "October", "December"])
        kind = rng.randrange(3)
        if kind == 0:
            text = (f"{f} {l}, aged {age}, moved to {c} last year and can be reached at "
                    f"{f.lower()}.{l.lower()}@example.com.")
            keys = "name, age, city, email"
        elif kind == 1:
            text = (f"Order #{rng.randint(1000, 9999)}: {qty} x {rng.choice(products)} at ${price} each, "
                    f"shipped to {f} {l} in {c} on {month} {day}.")
            keys = "order_id, quantity, product, unit_price, customer, city, date"
        else:
            text = (f"On {month} {day}, {f} {l} booked a table for {qty} at a restaurant in {c} "
                    f"and paid a ${price} deposit.")
            keys = "date, name, party_size, city, deposit"
        out.append(f"Extract the following fields as JSON with keys {keys}.\n\nText: {text}")
    return out


def _chat_prompts(rng: random.Random, n: int) -> list[str]:
    """Everyday questions."""
    templates = [
        "What are some tips for {x}?", "How do I get better at {x}?", "Can you explain {y} in simple terms?",
        "Give me three ideas for {z}.", "What should I know before {x}?", "Why is {y} important?",
        "Write a short friendly message about {z}.",
    ]
    xs = ["cooking rice", "learning a language", "running a 5k", "saving money", "sleeping well",
          "keeping houseplants alive", "moving to a new city", "studying for exams", "public speaking", "baking bread"]
    ys = ["photosynthesis", "inflation", "the water cycle", "vaccines", "gravity", "recycling", "compound interest",
          "the moon's phases", "time zones", "electric cars"]
    zs = ["a rainy weekend", "a birthday party", "a team lunch", "a picnic", "a family dinner", "a road trip",
          "a book club", "a garden project"]
    lead = ["", "Quick question: ", "I'm a complete beginner. ", "My friend asked me this: "]
    tail = ["", " Keep it brief.", " Please use a numbered list.", " Answer in two or three sentences."]
    return [rng.choice(lead) + rng.choice(templates).format(x=rng.choice(xs), y=rng.choice(ys), z=rng.choice(zs))
            + rng.choice(tail) for _ in range(n)]


_BUILDERS = {"code": _code_prompts, "math": _math_prompts, "extraction": _extraction_prompts, "chat": _chat_prompts}


def prompts(workload: str, n: int = 200, seed: int = 0) -> list[str]:
    """`n` distinct prompts of one workload, deterministic for a seed."""
    rng = random.Random(f"{workload}-{seed}")
    seen, out = set(), []
    for _ in range(50):  # templates can repeat; draw until n distinct ones (or give up)
        for p in _BUILDERS[workload](rng, n):
            if p not in seen:
                seen.add(p)
                out.append(p)
        if len(out) >= n:
            return out[:n]
    return out


def split(workload: str, n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train / held-out prompts: one seeded shuffle of the workload's pool."""
    pool = prompts(workload, max(200, n_train + n_heldout), seed)
    random.Random(seed).shuffle(pool)
    if n_train + n_heldout > len(pool):
        raise ValueError(f"{workload}: {n_train}+{n_heldout} prompts asked, only {len(pool)} distinct")
    return pool[:n_train], pool[len(pool) - n_heldout:]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """A single-turn chat prompt ready for the answer (raw text when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        return list(enc["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                   desc: str = "generate") -> list[list[int]]:
    """The target's greedy answer to each prompt (left-padded batches), cut after the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    answers = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc=desc):
        batch = prompt_ids[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
    return answers


def distilled(model, tokenizer, target_key: str, workload: str, n_train: int, n_heldout: int, seed: int,
              max_new_tokens: int, batch_size: int, cache_dir) -> dict:
    """{"train": [...], "heldout": [...]} of {"prompt": ids, "answer": ids}, cached on disk as token ids.

    The cache key covers the target, the prompts and the generation settings, so a changed input never
    reuses stale answers."""
    train, heldout = split(workload, n_train, n_heldout, seed)
    key = hashlib.sha256(json.dumps([target_key, train, heldout, max_new_tokens]).encode()).hexdigest()[:16]
    path = pathlib.Path(cache_dir) / f"{workload}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = {}
    for name, texts in (("train", train), ("heldout", heldout)):
        ids = [chat_ids(tokenizer, p) for p in texts]
        answers = greedy_answers(model, tokenizer, ids, max_new_tokens, batch_size, desc=f"{workload}/{name}")
        result[name] = [{"prompt": p, "answer": a} for p, a in zip(ids, answers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result
