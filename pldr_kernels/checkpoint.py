"""Training checkpoints of ``pldr-train``: an HF-format model directory plus the state that makes a
resumed run continue exactly (docs/design.md §3.4.3).

Layout under the run's ``--out``::

    checkpoints/step-0000100/   config.json, model.safetensors (PLDRForCausalLM.save_pretrained),
                                tokenizer.model, training_state.pt (optimizer, scheduler, step, RNG
                                of every rank), trainer.json (settings, data position; readable)
    checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is written whole into a hidden temporary directory next to its final name, every file
and the directory fsync'ed, then renamed into place; only then is ``latest`` replaced (atomically,
``_io``). A save interrupted at any point leaves ``latest`` naming the previous complete checkpoint
and at most a hidden ``.step-….tmp-…`` directory, which the next save removes. Loads read
safetensors and ``torch.load(weights_only=True)``: nothing in a checkpoint is executed.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from dataclasses import dataclass

import torch

from . import _io

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_NAME = "training_state.pt"
TRAINER_NAME = "trainer.json"
PathLike = str | os.PathLike


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


# --------------------------------------------------------------------------------------------
# RNG state of one process
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """torch's CPU generator, every CUDA device's (when CUDA is initialised) and Python's
    ``random`` (this module uses no numpy)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def _fsync_tree(directory: str) -> None:
    for root, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def remove_partial_saves(out_dir: PathLike) -> None:
    """Remove the hidden directories that interrupted saves left behind."""
    root = os.path.join(os.fspath(out_dir), CHECKPOINTS)
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".") and _io.TEMP_MARK in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(out_dir: PathLike, step: int, model, tokenizer, state: dict,
                    trainer: dict) -> str:
    """Write checkpoint ``step`` of the run in ``out_dir`` and point ``latest`` at it; returns its
    directory. ``model``: a PLDRForCausalLM holding the full weights; ``state``: what
    :func:`load_checkpoint` gives back (tensors, numbers, strings, lists, dicts, tuples — loadable
    with ``weights_only=True``); ``trainer``: JSON-serialisable settings and data position."""
    root = os.path.join(os.fspath(out_dir), CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    remove_partial_saves(out_dir)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    temp = os.path.join(root, f".{name}{_io.TEMP_MARK}{secrets.token_hex(6)}")
    os.mkdir(temp)
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        torch.save(state, os.path.join(temp, STATE_NAME))
        with open(os.path.join(temp, TRAINER_NAME), "w", encoding="utf-8") as f:
            json.dump(trainer, f, indent=2, sort_keys=True)
        _fsync_tree(temp)
        if os.path.exists(final):  # a second save of the same step (a resumed run's last)
            old = os.path.join(root, f".{name}.old{_io.TEMP_MARK}{secrets.token_hex(6)}")
            os.rename(final, old)
            os.rename(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _io.atomic_write_text(os.path.join(root, LATEST), name + "\n")
    return final


# --------------------------------------------------------------------------------------------
# Find and load
# --------------------------------------------------------------------------------------------
def run_has_checkpoint(out_dir: PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(out_dir), CHECKPOINTS, LATEST))


def find_checkpoint(path: PathLike) -> str:
    """The checkpoint directory that ``path`` names: a run's ``--out`` (its latest checkpoint), a
    ``checkpoints`` directory (its latest) or one checkpoint. FileNotFoundError otherwise."""
    path = os.fspath(path)
    for root in (os.path.join(path, CHECKPOINTS), path):
        latest = os.path.join(root, LATEST)
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                name = f.read().strip()
            found = os.path.join(root, name)
            if not name or os.sep in name or not os.path.isfile(os.path.join(found, STATE_NAME)):
                raise FileNotFoundError(f"{latest} names {name!r}, which is not a complete "
                                        f"checkpoint in {root}")
            return found
    if os.path.isfile(os.path.join(path, STATE_NAME)):
        return path
    raise FileNotFoundError(f"no pldr-train checkpoint at {path} (expected {CHECKPOINTS}/{LATEST}"
                            f", {LATEST} or {STATE_NAME} there)")


@dataclass
class Checkpoint:
    directory: str
    state: dict  # training_state.pt
    trainer: dict  # trainer.json
    config: dict  # config.json


def load_checkpoint(directory: PathLike) -> Checkpoint:
    """Read a checkpoint's training state (``weights_only=True``), trainer.json and config.json;
    the weights are read by ``PLDRForCausalLM.from_pretrained(directory)``."""
    directory = os.fspath(directory)
    state = torch.load(os.path.join(directory, STATE_NAME), map_location="cpu",
                       weights_only=True)
    with open(os.path.join(directory, TRAINER_NAME), encoding="utf-8") as f:
        trainer = json.load(f)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return Checkpoint(directory, state, trainer, config)

