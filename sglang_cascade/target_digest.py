"""Which target a draft head was trained on: a digest of the target's files, recorded on both sides.

A head learns one target's hidden states. Against another target (another build of the default
MoE, a fine-tune) it still runs, only its drafts are rejected more often, and nothing says why. So
a target folder records the digest of its files (target_digest.json, written where the project
builds the folder), a head's config.json records the digest of the target it was trained on
(`cascade_target_digest`, written by training), and the engine, its server, training and the
SGLang plugin compare them when they load the pair. Pure Python: the plugin checks in SGLang's
launcher before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

DIGEST_FILE = "target_digest.json"
HEAD_KEY = "cascade_target_digest"
# A folder without a recorded digest is hashed at load only up to this size (a 30B MoE's 60 GB would
# take minutes to read; there the check is skipped and says so).
MAX_HASHED_BYTES = 4 << 30


class TargetMismatch(ValueError):
    """A head trained on another target, refused because the user asked for strictness."""


def compute_digest(folder) -> str:
    """sha256 over config.json, then every *.safetensors file in name order; the first 16 hex digits."""
    folder = pathlib.Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def record_digest(folder) -> str:
    """Compute the folder's digest and record it beside its weights."""
    digest = compute_digest(folder)
    (pathlib.Path(folder) / DIGEST_FILE).write_text(json.dumps({"digest": digest}) + "\n")
    return digest


def target_digest(folder) -> str | None:
    """The folder's recorded digest; computed where none is recorded and the weights are small; else None."""
    folder = pathlib.Path(folder)
    try:
        return json.loads((folder / DIGEST_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        pass
    if not (folder / "config.json").is_file():
        return None
    if sum(p.stat().st_size for p in folder.glob("*.safetensors")) > MAX_HASHED_BYTES:
        return None
    return compute_digest(folder)


def record_head_target(head_folder, digest: str) -> None:
    """Write into a head's config.json the digest of the target it was trained on."""
    path = pathlib.Path(head_folder) / "config.json"
    config = json.loads(path.read_text())
    config[HEAD_KEY] = digest
    path.write_text(json.dumps(config, indent=2) + "\n")


def head_target_digest(head_folder) -> str | None:
    """The digest of the target a head was trained on, as its config.json records it."""
    try:
        return json.loads((pathlib.Path(head_folder) / "config.json").read_text()).get(HEAD_KEY)
    except (OSError, ValueError):
        return None


def check_pair(target_folder, head_folder, strict: bool = False, strict_flag: str = "--strict-target-hash") -> str:
    """Compare the head's recorded target with the target; return one line saying what was found.

    A mismatch returns a warning naming both digests and the fix, or raises TargetMismatch when strict.
    """
    trained_on, target = head_target_digest(head_folder), target_digest(target_folder)
    if trained_on is None or target is None:
        missing = "the head records no target" if trained_on is None else "the target's digest is not recorded"
        return f"target digest not checked: {missing}"
    if trained_on == target:
        return f"target digest {target} matches the one the draft head was trained on"
    message = (f"the draft head {head_folder} was trained on target {trained_on}, but {target_folder} is "
               f"{target}: its drafts will be rejected more often. Rebuild the target it was trained on (the "
               f"embedded default MoE: `python scripts/build_default_moe.py --force`) or retrain the head on "
               f"this target (`python -m sglang_cascade.training.train_eagle3 --target {target_folder} --out HEAD`)")
    if strict:
        raise TargetMismatch(f"{message}; refused by {strict_flag}")
    return f"warning: {message}; add {strict_flag} to refuse such a pair"
