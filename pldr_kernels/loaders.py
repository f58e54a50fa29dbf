"""Checkpoint formats of PLDR-LLM (docs/spec.md §4): the authors' ``.pth`` and HF-format
directories.

- ``.pth``: ``torch.save({'model_state_dict': OrderedDict(fp32), 'loss', 'accuracy', …})``, read
  with ``torch.load(weights_only=True, mmap=True)``; hyperparameters from a
  ``*_hyperparameters.py`` sidecar whose ``hpdict`` literal is parsed with ``ast`` (never
  executed).
- HF directory: ``config.json`` + ``model.safetensors``.

A load is bounded by its checkpoint (docs/spec.md §4): the config is read and validated, the
checkpoint's shapes are read without its data (the safetensors header; the ``.pth`` memory-mapped),
a config that describes a model much larger than the checkpoint is refused before anything is
built, the model is built on the meta device (no memory, no random init), every key and shape is
checked against it (one error listing all missing, unexpected and mis-shaped keys), and only then
is each weight allocated and copied from the checkpoint. Whatever is wrong with a file raises a
:class:`CheckpointError` naming the file and the key. Saves are atomic (``_io.py``): a kill
mid-save leaves the old checkpoint loadable.
"""
from __future__ import annotations

import ast
import contextlib
import glob
import json
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from . import _io
from .config import HPDICT_READ_KEYS, PLDRConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PathLike = str | os.PathLike
Shape = tuple[int, ...]
# A config may describe a model up to this many times the elements its checkpoint holds and still
# be built (on the meta device) to list the keys that differ; beyond, it is refused unbuilt.
MAX_MODEL_TO_CHECKPOINT_RATIO = 2
_LAYER_KEY = re.compile(r"decoder\.dec_layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, malformed, or not fitting its config. The
    message names the file and the key."""


# --------------------------------------------------------------------------------------------
# State-dict checks
# --------------------------------------------------------------------------------------------
def _check_shapes(model: nn.Module, shapes: Mapping[str, Shape], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key at once."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    unexpected = [str(k) for k in shapes if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(shapes[k])} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in shapes and tuple(shapes[k]) != tuple(v.shape)]
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


def check_tensors(state_dict, source: str, name: str = "state dict") -> dict[str, torch.Tensor]:
    """``state_dict`` as a dict of tensors with string keys, or CheckpointError naming the first
    entry that is not."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: {name} must be a dict of tensors, got a "
                              f"{type(state_dict).__name__}")
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: {name} has a key {k!r} of type {type(k).__name__}; "
                                  f"the keys of a state dict are strings")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: {name}[{k!r}] is of type {type(v).__name__}, "
                                  f"expected a tensor")
    return dict(state_dict)


def check_state_dict(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key at once."""
    state_dict = check_tensors(state_dict, source)
    _check_shapes(model, {k: tuple(v.shape) for k, v in state_dict.items()}, source)


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
# Building a model from a checkpoint: bounded first, on the meta device, then materialised
# --------------------------------------------------------------------------------------------
def check_config_fits(config: PLDRConfig, held: Mapping[str, int], source: str,
                      config_source: str) -> None:
    """Refuse, before building anything, a config whose model would hold more than
    MAX_MODEL_TO_CHECKPOINT_RATIO times the elements the checkpoint holds (``held``: elements per
    key). Building even on the meta device costs time per module, so a config.json asking for
    10⁹ layers must not get that far."""
    wanted, have = config.state_dict_numel(), sum(held.values())
    if wanted <= MAX_MODEL_TO_CHECKPOINT_RATIO * have:
        return
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, held) if m}
    raise CheckpointError(
        f"{config_source} describes a model with {wanted:,} state-dict elements "
        f"(num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
        f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}, "
        f"A_dff={config.A_dff}, num_reslayerA={config.num_reslayerA}, num_denseA="
        f"{config.num_denseA}), more than {MAX_MODEL_TO_CHECKPOINT_RATIO}x the {have:,} that "
        f"{source} holds ({len(held)} tensors, {len(layers)} decoder layer(s)); refusing to build "
        f"it. The config does not belong to these weights.")


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")


@contextlib.contextmanager
def _skipped_init() -> Iterator[None]:
    """``torch.nn.init``'s fillers as no-ops: on the meta device they have nothing to fill, and
    their meta implementations import torch._dynamo (~2 s of a CLI's start-up, docs/design.md
    §2)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _build_on_meta(cls, config: PLDRConfig) -> nn.Module:
    """The model's structure without memory or random init: every parameter and persistent buffer
    on the meta device (the RoPE tables, not in a checkpoint, are built for real)."""
    with torch.device("meta"), _skipped_init():
        return cls(config)


def _materialise(model: nn.Module, read: Callable[[str], torch.Tensor]) -> None:
    """Give every meta parameter and buffer of ``model`` its checkpoint value: a new contiguous
    CPU tensor of the model's dtype with ``read(key)`` copied in (so the casts and layouts are
    those of a ``load_state_dict`` copy). Tied parameters get one tensor, the value of their last
    key (the one a copy would leave)."""
    variables = model.state_dict(keep_vars=True)
    by_identity: dict[int, list[str]] = {}
    for key, v in variables.items():
        by_identity.setdefault(id(v), []).append(key)
    state: dict[str, torch.Tensor] = {}
    for keys in by_identity.values():
        meta = variables[keys[-1]]
        value = torch.empty(meta.shape, dtype=meta.dtype, device="cpu").copy_(read(keys[-1]))
        if isinstance(meta, nn.Parameter):
            value = nn.Parameter(value, requires_grad=meta.requires_grad)
        for key in keys:
            state[key] = value
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # every persistent tensor is in the state dict; a new non-persistent one is not
        raise RuntimeError(f"internal error: {left} stayed on the meta device after loading (a "
                           f"non-persistent buffer must be built for real in __init__)")


def _check_int8_dtypes(model: nn.Module, dtypes: Mapping[str, torch.dtype], source: str) -> None:
    """An int8 tensor of the model must be int8 in the checkpoint and the other way round (a
    load would convert it silently): CheckpointError listing every key that is not."""
    bad = [f"{k}: checkpoint {dtypes[k]} vs model {v.dtype}"
           for k, v in model.state_dict().items()
           if k in dtypes and (v.dtype == torch.int8) != (dtypes[k] == torch.int8)]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) int8 on one side only (config.json's \"quantization\" "
            f"says whether the weights are int8; quantize_weights + save_pretrained write both): "
            + ", ".join(bad))


def _load_checked(cls, config: PLDRConfig, shapes: Mapping[str, Shape], held: Mapping[str, int],
                  read: Callable[[str], torch.Tensor], source: str, config_source: str,
                  quantization: str | None = None,
                  dtypes: Mapping[str, torch.dtype] | None = None):
    check_config_fits(config, held, source, config_source)
    model = _build_on_meta(cls, config)
    if quantization == "int8":
        from .quantize import convert_to_int8
        convert_to_int8(model)
    _check_shapes(model, shapes, source)
    if dtypes is not None:
        _check_int8_dtypes(model, dtypes, source)
    _materialise(model, read)
    return model.eval()


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


_UNEVALUATED = (_NotLiteral, ValueError, TypeError, ZeroDivisionError, OverflowError,
                RecursionError)


def read_hyperparameters(path: PathLike) -> dict:
    """The ``hpdict`` of an authors' ``*_hyperparameters.py`` file, without executing it.

    Entries are read as Python would run the file (a key given twice takes its later value).
    Entries that are not literals (or the simple arithmetic above) are left out, unless the config
    reads them (``config.HPDICT_READ_KEYS``: the sizes and the activation): those raise a
    CheckpointError naming the file, the line and the key, since leaving one out would silently
    build a model with a default in its place."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot parse the hyperparameter file ({e})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id == "hpdict" for t in node.targets):
            return _read_hpdict(path, source, node.value)
    raise CheckpointError(f"{path}: no `hpdict = {{...}}` assignment found")


def _read_hpdict(path: PathLike, source: str, node: ast.Dict) -> dict:
    entries: dict = {}  # key → (its value's node, the line of an earlier value or None)
    for key_node, value_node in zip(node.keys, node.values):
        if key_node is None:  # a ``**spread``: nothing to read without running the file
            continue
        try:
            key = ast.literal_eval(key_node)
            earlier = entries[key][0].lineno if key in entries else None
        except _UNEVALUATED:
            continue
        entries[key] = (value_node, earlier)
    out = {}
    for key, (value_node, earlier) in entries.items():
        try:
            out[key] = _safe_value(value_node)
        except _UNEVALUATED as e:
            if key not in HPDICT_READ_KEYS:
                continue
            twice = (f"; it is given twice (lines {earlier} and {value_node.lineno}) and the "
                     f"later value is the one Python would use" if earlier is not None else "")
            why = f": {type(e).__name__}: {e}" if str(e) else ""
            text = ast.get_source_segment(source, value_node) or ast.unparse(value_node)
            raise CheckpointError(
                f"{path}, line {value_node.lineno}: hpdict[{key!r}] = {text} cannot be "
                f"evaluated without running the file (literals, + - * / //, int(), floor() and "
                f"F.silu are read){why}{twice}. The config needs it: write it as a literal, or "
                f"pass config=PLDRConfig(...)") from None
    return out


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
    hpdict = read_hyperparameters(hyperparameters)
    try:
        return PLDRConfig.from_hyperparameters(hpdict)
    except ValueError as e:
        raise CheckpointError(f"{hyperparameters}: {e}") from None


def read_config(path: PathLike, config: PLDRConfig | None = None, hyperparameters=None
                ) -> PLDRConfig:
    """The config of a checkpoint, read and validated without its weights: an HF-format
    directory's ``config.json``, or the config (or sidecar) of an authors' ``.pth`` as
    :func:`load_pth` resolves it. What ``pldr-bench --checkpoint`` checks before a run."""
    if os.path.isdir(path):
        return _read_config_json(os.path.join(path, CONFIG_NAME))
    return _resolve_config(path, config, hyperparameters)


def _read_config_json(config_path: str) -> PLDRConfig:
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: an HF-format PLDR-LLM directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(config_path, encoding="utf-8") as f:
            fields = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an int of > 4300 digits
        raise CheckpointError(f"{config_path}: not a readable JSON file ({e})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object of config fields, got a "
                              f"JSON {_JSON_TYPES.get(type(fields), type(fields).__name__)}")
    try:
        return PLDRConfig.from_dict(fields)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------
def load_pth(cls, path: PathLike, config: PLDRConfig | None = None, hyperparameters=None,
             map_location="cpu"):
    """The authors' ``.pth`` (a dict with 'model_state_dict'; a bare state dict is accepted),
    memory-mapped, so its shapes are checked against the config before anything is allocated.
    ``map_location`` is where torch.load puts the tensors; the model is built on the CPU."""
    config = _resolve_config(path, config, hyperparameters)
    source = str(path)
    try:
        # mmap needs the zip format of torch.save (every torch since 1.6); older files are read.
        obj = torch.load(path, map_location=map_location, weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError,
            zipfile.BadZipFile) as e:
        raise CheckpointError(f"{source}: cannot read it as a torch.save file "
                              f"(weights_only): {e}") from None
    if isinstance(obj, dict) and "model_state_dict" in obj:
        state_dict = check_tensors(obj["model_state_dict"], source, "model_state_dict")
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = check_tensors(obj, source)
    else:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{source}: expected a dict with 'model_state_dict' (the authors' "
                              f"format) or a state dict, got {keys}")
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    # What the file backs: a stride-0 (expanded) tensor holds its storage's elements, not numel.
    held = {k: min(v.numel(), v.untyped_storage().nbytes() // v.element_size())
            for k, v in state_dict.items()}
    return _load_checked(cls, config, shapes, held, state_dict.__getitem__, source, source)


def save_pth(model: nn.Module, path: PathLike) -> None:
    """Write the authors' format: ``{'model_state_dict': fp32 OrderedDict}``, atomically."""
    from .quantize import quantization_of
    if quantization_of(model) is not None:
        raise ValueError("save_pth writes the authors' fp32 format, which has no int8 weights; "
                         "save a quantize_weights model with save_pretrained")
    state = {"model_state_dict": _plain_state_dict(model, torch.float32)}
    _io.atomic_write(path, lambda temp: torch.save(state, temp))


def load_pretrained(cls, directory: PathLike, map_location="cpu"):
    """An HF-format directory: ``config.json`` + ``model.safetensors``. The shapes come from the
    safetensors header, the tensors are read one at a time into the model. ``map_location`` is
    where safetensors reads them to; the model is built on the CPU."""
    from safetensors import SafetensorError, safe_open
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: an HF-format PLDR-LLM directory holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _read_config_json(config_path)
    quantization = _read_quantization(config_path)
    device = map_location if isinstance(map_location, str) else str(map_location)
    with contextlib.ExitStack() as stack:
        try:
            weights = stack.enter_context(safe_open(weights_path, framework="pt", device=device))
            shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
            dtypes = {k: _SAFETENSORS_DTYPES.get(weights.get_slice(k).get_dtype())
                      for k in weights.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights_path}: not a readable safetensors file "
                                  f"({e})") from None
        # safetensors has checked the header's sizes against the file's bytes.
        held = {k: math.prod(shape) for k, shape in shapes.items()}
        return _load_checked(cls, config, shapes, held, weights.get_tensor, weights_path,
                             config_path, quantization, dtypes)


_SAFETENSORS_DTYPES = {"I8": torch.int8, "F32": torch.float32, "BF16": torch.bfloat16,
                       "F16": torch.float16, "F64": torch.float64, "BOOL": torch.bool}


def _read_quantization(config_path: str) -> str | None:
    """config.json's ``"quantization"`` (None when absent): what quantize_weights made."""
    from .quantize import QUANTIZATIONS
    with open(config_path, encoding="utf-8") as f:
        value = json.load(f).get("quantization")
    if value is not None and value not in QUANTIZATIONS:
        raise CheckpointError(f"{config_path}: \"quantization\" must be one of {QUANTIZATIONS} or "
                              f"absent, got {value!r}")
    return value


def save_pretrained(model: nn.Module, directory: PathLike) -> None:
    """Write ``model.safetensors`` and ``config.json`` atomically, the weights first: both are
    written to temporary files before either replaces the old one (``_io.atomic_write_all``), so
    a kill mid-save leaves the old checkpoint as it was."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    from .quantize import quantization_of
    config = model.config.to_dict()
    dtype = getattr(model, "dtype", model.final_layer.weight.dtype)  # the activations'
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    quantization = quantization_of(model)
    if quantization is not None:
        config["quantization"] = quantization  # int8 weights + weight_scale in the safetensors
    state = _plain_state_dict(model)
    _io.atomic_write_all([
        (os.path.join(directory, WEIGHTS_NAME),
         lambda temp: save_file(state, temp, metadata={"format": "pt"})),
        (os.path.join(directory, CONFIG_NAME),
         _io.text_writer(json.dumps(config, indent=2, sort_keys=True)))])
