"""Checkpoint formats of PLDR-LLM (docs/spec.md §4): the authors' ``.pth`` and HF-format
directories.

- ``.pth``: ``torch.save({'model_state_dict': OrderedDict(fp32), 'loss', 'accuracy', …})``, read
  with ``torch.load(weights_only=True)``; hyperparameters from a ``*_hyperparameters.py`` sidecar
  whose ``hpdict`` literal is parsed with ``ast`` (never executed).
- HF directory: ``config.json`` + ``model.safetensors``.

Every load checks the keys first and raises one error listing all missing, unexpected and
mis-shaped entries.
"""
from __future__ import annotations

import ast
import glob
import json
import math
import os
from collections import OrderedDict

import torch
from torch import nn

from .config import PLDRConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (keys listed in the message)."""


# --------------------------------------------------------------------------------------------
# State-dict checks
# --------------------------------------------------------------------------------------------
def check_state_dict(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key at once."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or misshaped):
        return
    parts = [f"{source} does not match the model config "
             f"(layers={model.config.num_hidden_layers}, hidden={model.config.hidden_size}, "
             f"heads={model.config.num_attention_heads}, custom_G_type="
             f"{model.config.custom_G_type!r})."]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
        if keys:
            parts.append(f"{len(keys)} {title} key(s): " + ", ".join(keys))
    raise CheckpointError("\n".join(parts))


def load_checked_state_dict(model: nn.Module, state_dict: dict, source: str = "checkpoint"
                            ) -> None:
    check_state_dict(model, state_dict, source)
    # In-place copy: keeps the packed-weight views of nn.py valid and casts to the model dtypes.
    model.load_state_dict(state_dict, strict=True)


def _plain_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> OrderedDict:
    """Independent contiguous tensors (the packed views share storage, which safetensors
    refuses)."""
    out = OrderedDict()
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous().clone()
    return out


# --------------------------------------------------------------------------------------------
# The authors' hyperparameter sidecar (parsed, never executed)
# --------------------------------------------------------------------------------------------
class _NotLiteral(Exception):
    pass


_FLOOR_NAMES = {"int", "floor", "math.floor", "np.floor", "numpy.floor"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    raise _NotLiteral


def _safe_value(node: ast.AST):
    """Literals plus the arithmetic the authors write in hpdict (``int(np.floor(14*64*4*2/3))``)
    and activation references (``F.silu`` → 'silu'); anything else is not evaluated."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp):
        left, right = _safe_value(node.left), _safe_value(node.right)
        if not all(isinstance(x, (int, float)) for x in (left, right)):
            raise _NotLiteral
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
               ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
               ast.FloorDiv: lambda a, b: a // b}
        if type(node.op) not in ops:
            raise _NotLiteral
        return ops[type(node.op)](left, right)
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
        name = _dotted(node.func)
        arg = _safe_value(node.args[0])
        if name in _FLOOR_NAMES and isinstance(arg, (int, float)):
            return int(math.floor(arg)) if name != "int" else int(arg)
        raise _NotLiteral
    if isinstance(node, (ast.Attribute, ast.Name)):
        name = _dotted(node)
        if name.split(".")[-1] == "silu":
            return "silu"
    raise _NotLiteral


def read_hyperparameters(path: PathLike) -> dict:
    """The ``hpdict`` of an authors' ``*_hyperparameters.py`` file, without executing it.

    Entries that are not literals (or the simple arithmetic above) are left out."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id == "hpdict" for t in node.targets):
            out = {}
            for key, value in zip(node.value.keys, node.value.values):
                if key is None:
                    continue
                try:
                    out[ast.literal_eval(key)] = _safe_value(value)
                except (_NotLiteral, ValueError, TypeError, ZeroDivisionError):
                    continue
            return out
    raise ValueError(f"{path}: no `hpdict = {{...}}` assignment found")


def _resolve_config(path: PathLike, config: PLDRConfig | None, hyperparameters
                    ) -> PLDRConfig:
    if config is not None:
        if not isinstance(config, PLDRConfig):
            raise TypeError(f"config must be a PLDRConfig, got {type(config).__name__}")
        return config
    if isinstance(hyperparameters, PLDRConfig):
        return hyperparameters
    if isinstance(hyperparameters, dict):
        return PLDRConfig.from_hyperparameters(hyperparameters)
    if hyperparameters is None:
        directory = os.path.dirname(os.path.abspath(path))
        sidecars = sorted(glob.glob(os.path.join(directory, "*_hyperparameters.py")))
        if len(sidecars) != 1:
            raise ValueError(
                f"{path}: pass config=PLDRConfig(...) or hyperparameters=<path to the "
                f"*_hyperparameters.py file>; found {len(sidecars)} sidecar(s) next to the "
                f"checkpoint: {sidecars}")
        hyperparameters = sidecars[0]
    return PLDRConfig.from_hyperparameters(read_hyperparameters(hyperparameters))


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------
def load_pth(cls, path: PathLike, config: PLDRConfig | None = None, hyperparameters=None,
             map_location="cpu"):
    """The authors' ``.pth`` (a dict with 'model_state_dict'; a bare state dict is accepted)."""
    config = _resolve_config(path, config, hyperparameters)
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(obj, dict) and "model_state_dict" in obj:
        state_dict = obj["model_state_dict"]
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
    else:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a dict with 'model_state_dict' (the authors' "
                              f"format) or a state dict, got {keys}")
    model = cls(config)
    load_checked_state_dict(model, state_dict, source=str(path))
    return model.eval()


def save_pth(model: nn.Module, path: PathLike) -> None:
    """Write the authors' format: ``{'model_state_dict': fp32 OrderedDict}``."""
    torch.save({"model_state_dict": _plain_state_dict(model, torch.float32)}, path)


def load_pretrained(cls, directory: PathLike, map_location="cpu"):
    """An HF-format directory: ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import load_file
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: an HF-format PLDR-LLM directory holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    with open(config_path, encoding="utf-8") as f:
        config = PLDRConfig.from_dict(json.load(f))
    device = map_location if isinstance(map_location, str) else str(map_location)
    state_dict = load_file(weights_path, device=device)
    model = cls(config)
    load_checked_state_dict(model, state_dict, source=weights_path)
    return model.eval()


def save_pretrained(model: nn.Module, directory: PathLike) -> None:
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.final_layer.weight.dtype).replace("torch.", "")
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(_plain_state_dict(model), os.path.join(directory, WEIGHTS_NAME),
              metadata={"format": "pt"})
