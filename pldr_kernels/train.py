"""``pldr-train --data PATHS --out DIR``: train a PLDR-LLM on text files, on the pldr ops
(docs/design.md §3.4.3).

The authors' recipe by default: AdamW (β 0.9/0.95, eps 1e-5, weight decay 0.1), linear warm-up
then cosine decay to 0.1× the peak learning rate, gradients clipped by value at 1.0, the
cross-entropy of next tokens with [PAD] left out, documents ([END] appended) packed to the
context length (``data.py``), bf16 autocast on CUDA. Checkpoints (``checkpoint.py``) are
HF-format directories plus the optimizer, scheduler, data position and RNG states, written
atomically; ``--resume`` continues a run exactly. Several processes through torchrun
(``torchrun --nproc-per-node N -m pldr_kernels.train ...``): each rank trains on its rows of the
same global batch, under DDP or FSDP2 (``--parallel``).

``--batch-size`` is the global batch of one optimizer step (sequences), split over the processes
and the ``--grad-accum`` micro-batches; the loss of each micro-batch is weighted by its share of
the global batch's labelled tokens, so every split gives the gradients of the whole batch.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _io, checkpoint, data
from .cli import _args
from .config import PLDRConfig

PROG = "pldr-train"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "loss.png"
# The small model of the demo and the tests (docs/design.md §3.4.3): 2 heads of 64, 2 layers;
# the vocabulary comes from the tokenizer.
TINY = dict(hidden_size=128, intermediate_size=341, num_hidden_layers=2, num_attention_heads=2,
            head_dim=64, A_dff=170, num_reslayerA=2, num_denseA=2, max_position_embeddings=256)
PRESETS = {"tiny": TINY, "110M": {}}  # 110M: PLDRConfig's defaults, the paper's model
DEFAULT_VOCAB = {"tiny": 2000, "110M": 32000}
# The authors' optimiser and schedule.
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-5
WEIGHT_DECAY = 0.1
FINAL_LR_FRACTION = 0.1
CLIP_VALUE = 1.0
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _args.ArgumentParser(
        prog=PROG, description="Train a PLDR-LLM on UTF-8 text files (one document per file).")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files or directories of them")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the run's directory: checkpoints/, metrics.jsonl, loss.png")
    p.add_argument("--config", default=None, metavar="tiny|110M|FILE",
                   help="a preset or a config.json / *_hyperparameters.py (default: tiny, or the "
                        "resumed checkpoint's)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a SentencePiece .model or a directory with tokenizer.model (default: "
                        "train one on --data)")
    p.add_argument("--vocab-size", type=_args.positive,
                   help="pieces of the tokenizer trained on --data (default: tiny 2000, 110M "
                        "32000)")
    p.add_argument("--tokenizer-lines", type=_args.non_negative, default=200_000,
                   help="lines of --data the tokenizer is trained on, drawn with --seed (0 = all)")
    p.add_argument("--steps", type=_args.positive, default=1000, help="optimizer steps in all")
    p.add_argument("--batch-size", type=_args.positive, default=8,
                   help="sequences per optimizer step, over all processes and micro-batches")
    p.add_argument("--seq-len", type=_args.positive, default=None,
                   help="tokens per sequence (default: the config's max_position_embeddings)")
    p.add_argument("--lr", type=_args.positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=_args.non_negative, default=None,
                   help="linear warm-up steps (default: 10%% of --steps, at most 2000)")
    p.add_argument("--grad-accum", type=_args.positive, default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--eval-every", type=_args.non_negative, default=100,
                   help="steps between held-out evaluations (0: only at the end)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="fraction of the packed sequences held out")
    p.add_argument("--eval-sequences", type=_args.positive, default=32,
                   help="held-out sequences an evaluation reads (at most)")
    p.add_argument("--save-every", type=_args.non_negative, default=500,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint (a run's --out, or one checkpoint)")
    p.add_argument("--seed", type=_args.non_negative, default=0)
    p.add_argument("--device", type=_args.device_name, default=None,
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype: bfloat16 = autocast, weights fp32 (default: bfloat16 on "
                        "CUDA, float32 on CPU)")
    p.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp",
                   help="how processes of a torchrun share the model")
    p.add_argument("--model-impl", choices=("pldr", "reference"), default="pldr",
                   help="pldr: PLDRForCausalLM on the fused ops; reference: the authors'-style "
                        "model (reference_model.py), for comparison")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return _args.run(PROG, _main, argv)


# --------------------------------------------------------------------------------------------
# The resolved settings (everything checked before anything is written)
# --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_config(spec: str | None) -> tuple[PLDRConfig | None, dict]:
    """``--config``: (a config from a file, or None for a preset) and the preset's fields."""
    if spec is None or spec in PRESETS:
        return None, PRESETS[spec or "tiny"]
    with _args.user_errors("--config"):
        _args.require_file(spec, "--config")
        if spec.endswith(".py"):
            from .loaders import read_hyperparameters
            return PLDRConfig.from_hyperparameters(read_hyperparameters(spec)), {}
        with open(spec, encoding="utf-8") as f:
            try:
                fields = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{spec} is not JSON ({e})") from None
        return PLDRConfig.from_dict(fields), {}


def check_out_dir(out: str, resuming_here: bool) -> None:
    """``--out`` must be a directory we can write (or one we can create), and must not hold
    another run unless it is the one resumed. Creates nothing: a probe file is made and removed
    in ``out`` or in its nearest existing parent."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise _args.UsageError(f"--out {out}: exists and is not a directory")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is not a directory")
        os.remove(_io.temporary_path(os.path.join(existing, "probe")))
    except OSError as e:
        raise _args.UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if checkpoint.run_has_checkpoint(out) and not resuming_here:
        raise _args.UsageError(f"--out {out}: already holds a training run (checkpoints/latest); "
                               f"continue it with --resume {out}, or choose another --out")


@contextlib.contextmanager
def data_errors():
    """A DataError (its message names the option and file) as a usage error; other bad-file
    errors prefixed with --data."""
    try:
        yield
    except data.DataError as e:
        raise _args.UsageError(str(e)) from None
    except (OSError, ValueError) as e:
        raise _args.UsageError(f"--data: {e}") from None


def config_differences(a: dict, b: dict) -> list[str]:
    keys = [f.name for f in PLDRConfig.__dataclass_fields__.values()]
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


RESUME_MUST_MATCH = ("seq_len", "batch_size", "seed", "eval_fraction", "model_impl")


def resolve_device(name: str | None, dist_: Dist) -> torch.device:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    _args.check_device(name)
    if name == "cuda" and dist_.world > 1:
        name = f"cuda:{dist_.local_rank}"
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# Schedule, loss
# --------------------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int) -> float:
    """The authors' schedule as a multiple of the peak lr at optimizer step ``step`` (0-based):
    linear warm-up over ``warmup`` steps, then cosine decay to FINAL_LR_FRACTION at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def labels_of(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    return ids.masked_fill(ids == pad_id, IGNORE_INDEX)


def labelled_targets(ids: torch.Tensor, pad_id: int) -> int:
    """Positions that a next-token loss counts (position t predicts t+1; [PAD] targets left out)."""
    return int((ids[:, 1:] != pad_id).sum())


# --------------------------------------------------------------------------------------------
# Metrics and the loss curve
# --------------------------------------------------------------------------------------------
class Metrics:
    """``metrics.jsonl``: one JSON object per line (training steps and evaluations). A resumed
    run first drops the lines past its checkpoint's step (that the interrupted run wrote after
    saving)."""

    def __init__(self, out: str, resume_step: int | None, enabled: bool):
        self.path = os.path.join(out, METRICS_NAME)
        self.enabled = enabled
        self.warned = False
        self.records: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.records = [r for r in map(json.loads, filter(str.strip, f))
                                if r["step"] <= resume_step]
        _io.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(self.path, "a", encoding="utf-8")  # closed by close()

    def log(self, record: dict) -> None:
        if self.enabled:
            self.records.append(record)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()

    def plot(self, path: str) -> None:
        """The training and held-out loss against the step, as a PNG (matplotlib, Agg)."""
        if not self.enabled or not self.records:
            return
        try:
            import matplotlib
        except ImportError:  # the train extra; the metrics are in metrics.jsonl regardless
            if not self.warned:
                print(f"{PROG}: no {CURVE_NAME} (matplotlib is not installed: pip install "
                      f"pldr-kernels[train])", file=sys.stderr)
                self.warned = True
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        held = [(r["step"], r["eval_loss"]) for r in self.records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="training loss", lw=1)
        if held:
            ax.plot(*zip(*held), "o-", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        _io.atomic_write(path, lambda temp: fig.savefig(temp, dpi=100))
        plt.close(fig)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    dist_ = Dist.from_env()
    if not args.no_progress and importlib.util.find_spec("tqdm") is None:
        raise _args.UsageError("the progress bar needs tqdm (pip install pldr-kernels[train]); "
                               "or pass --no-progress")
    if not 0.0 <= args.eval_fraction < 1.0:
        raise _args.UsageError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")

    # ---- resume: the checkpoint, its settings and config ----
    resumed = None
    if args.resume is not None:
        with _args.user_errors("--resume"):
            resumed = checkpoint.load_checkpoint(checkpoint.find_checkpoint(args.resume))
    resuming_here = resumed is not None and (
        os.path.realpath(os.path.dirname(os.path.dirname(resumed.directory)))
        == os.path.realpath(args.out))
    check_out_dir(args.out, resuming_here)

    file_config, preset = resolve_config(args.config)
    # ---- data (all files read and checked before anything is trained or written) ----
    with data_errors():
        files = data.corpus_files(args.data)
        documents = data.read_documents(files)

    # ---- tokenizer ----
    from .tokenizer import PLDRTokenizer
    if resumed is not None:
        with _args.user_errors("--resume"):
            tokenizer = PLDRTokenizer.from_pretrained(resumed.directory)
    elif args.tokenizer is not None:
        with _args.user_errors("--tokenizer"):
            tokenizer = PLDRTokenizer.from_path(args.tokenizer)
    else:
        vocab = args.vocab_size or (file_config.vocab_size if file_config else
                                    DEFAULT_VOCAB[args.config or "tiny"])
        with _args.user_errors("--vocab-size"):
            tokenizer = PLDRTokenizer.train(files, vocab, input_sentence_size=args.tokenizer_lines,
                                            seed=args.seed)

    # ---- model config ----
    if file_config is not None:
        config = file_config
    elif resumed is not None and args.config is None:
        config = PLDRConfig.from_dict(resumed.config)
    else:
        config = PLDRConfig(**{**preset, "vocab_size": tokenizer.vocab_size})
    with _args.user_errors("--tokenizer"):
        tokenizer.check_fits(config)
    if resumed is not None:
        wrong = config_differences(config.to_dict(), resumed.config)
        if wrong:
            raise _args.UsageError(f"--resume {args.resume}: the checkpoint's model config "
                                   f"differs from this run's (checkpoint vs --config): "
                                   f"{'; '.join(wrong)}")
    seq_len = args.seq_len or config.max_position_embeddings
    if seq_len > config.max_position_embeddings:
        raise _args.UsageError(f"--seq-len {seq_len} is above the model's "
                               f"max_position_embeddings ({config.max_position_embeddings})")
    micro, extra = divmod(args.batch_size, dist_.world * args.grad_accum)
    if extra or micro < 1:
        raise _args.UsageError(f"--batch-size {args.batch_size} must be a multiple of the "
                               f"processes ({dist_.world}) × --grad-accum ({args.grad_accum})")

    with data_errors():
        tokens = data.encode_documents(documents, tokenizer.encode_batch, tokenizer.END_ID)
        packed = data.pack(tokens, seq_len, args.eval_fraction, args.batch_size)
    settings = dict(seq_len=seq_len, batch_size=args.batch_size, seed=args.seed,
                    eval_fraction=args.eval_fraction, model_impl=args.model_impl,
                    grad_accum=args.grad_accum, lr=args.lr, steps=args.steps,
                    warmup_steps=(args.warmup_steps if args.warmup_steps is not None
                                  else min(2000, args.steps // 10)),
                    data_fingerprint=packed.fingerprint(), data_files=files)
    if resumed is not None:
        before = resumed.trainer["settings"]
        wrong = [f"{k}: {before.get(k)!r} vs {settings[k]!r}" for k in
                 (*RESUME_MUST_MATCH, "data_fingerprint") if before.get(k) != settings[k]]
        if wrong:
            raise _args.UsageError(f"--resume {args.resume}: the checkpoint was trained with "
                                   f"other settings (checkpoint vs now): {'; '.join(wrong)}; a "
                                   f"resumed run must read the same data in the same order")
        if resumed.state["step"] >= args.steps:
            raise _args.UsageError(f"--resume {args.resume}: the checkpoint is at step "
                                   f"{resumed.state['step']}, --steps is {args.steps}: nothing "
                                   f"to do")
    device = resolve_device(args.device, dist_)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return Trainer(args, dist_, config, tokenizer, packed, settings, device, dtype,
                   resumed).run()


class Trainer:
    def __init__(self, args, dist_: Dist, config: PLDRConfig, tokenizer, packed: data.PackedData,
                 settings: dict, device: torch.device, dtype: str, resumed):
        self.args, self.dist, self.config, self.tokenizer = args, dist_, config, tokenizer
        self.packed, self.settings, self.device, self.resumed = packed, settings, device, resumed
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        self.order = data.BatchOrder(len(packed.train), args.batch_size, args.seed)
        self.out = args.out

    # ---- set-up ----
    def build(self) -> None:
        from .model import PLDRForCausalLM
        from .reference_model import ReferencePLDR

        cls = PLDRForCausalLM if self.args.model_impl == "pldr" else ReferencePLDR
        torch.manual_seed(self.args.seed)
        model = cls(self.config)
        if self.resumed is not None:
            from .loaders import load_checked_state_dict
            weights = PLDRForCausalLM.from_pretrained(self.resumed.directory)
            load_checked_state_dict(model, weights.state_dict(), self.resumed.directory)
        self.model = model.to(self.device).train()
        self.wrapped = self.model
        if self.dist.world > 1:
            if self.args.parallel == "ddp":
                from torch.nn.parallel import DistributedDataParallel
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
            else:
                from torch.distributed.fsdp import fully_shard
                for layer in self.model.decoder.dec_layers:
                    fully_shard(layer)
                self.wrapped = fully_shard(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for every parameter (torch's default on CPU is a loop of ~10 ops
        # per parameter: ~5 ms of the tiny model's ~70 ms step on 2 Zen 5 cores).
        self.optimizer = torch.optim.AdamW(params, lr=self.args.lr, betas=ADAM_BETAS,
                                           eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                                           fused=self.device.type in ("cpu", "cuda"))
        warmup, total = self.settings["warmup_steps"], self.args.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total))
        self.start = 0
        if self.resumed is not None:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )
            state = self.resumed.state
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            self.scheduler.load_state_dict(state["scheduler"])
            rngs = state["rng"]
            checkpoint.set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs)
                                     else rngs[0])
            self.start = state["step"]

    # ---- one optimizer step ----
    def train_step(self, step: int) -> float:
        pad = self.tokenizer.PAD_ID
        rows = self.order.global_rows(step)
        n_global = labelled_targets(self.packed.train[rows], pad)
        micro_batches = self.order.micro_batches(step, self.dist.rank, self.dist.world,
                                                 self.args.grad_accum)
        total = torch.zeros((), dtype=torch.float64)
        for i, micro in enumerate(micro_batches):
            ids = self.packed.train[micro].to(self.device)
            n_micro = labelled_targets(ids, pad)
            last = i == len(micro_batches) - 1
            sync = (self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") and not last
                    else contextlib.nullcontext())
            with sync, self.autocast():
                loss = self.wrapped(ids, labels=labels_of(ids, pad)).loss
            # DDP and FSDP2 average the ranks' gradients: × world gives their sum.
            weight = n_micro * self.dist.world / n_global
            (loss * weight if weight != 1 else loss).backward()
            total += loss.detach().double().cpu() * (n_micro / n_global)
        torch.nn.utils.clip_grad_value_(self.model.parameters(), CLIP_VALUE)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.all_reduce_sum(total)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def all_reduce_sum(self, value: torch.Tensor) -> float:
        if self.dist.world > 1:
            import torch.distributed as tdist
            value = value.to(self.device)
            tdist.all_reduce(value)
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over (at most ``--eval-sequences``) held-out sequences, split over
        the ranks."""
        held = self.packed.eval[: self.args.eval_sequences]
        held = held[: len(held) // self.dist.world * self.dist.world]
        if len(held) == 0:
            return None
        mine = held[self.dist.rank::self.dist.world]
        micro = max(1, self.args.batch_size // (self.dist.world * self.args.grad_accum))
        pad = self.tokenizer.PAD_ID
        self.model.eval()
        nll = torch.zeros((), dtype=torch.float64)
        for ids in mine.split(micro):
            ids = ids.to(self.device)
            with self.autocast():
                loss = self.wrapped(ids, labels=labels_of(ids, pad)).loss
            nll += loss.double().cpu() * labelled_targets(ids, pad)
        self.model.train()
        count = labelled_targets(held, pad)
        return self.all_reduce_sum(nll) / count

    # ---- checkpoints ----
    def save(self, step: int) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        rngs = [checkpoint.rng_state()]
        if self.dist.world > 1:
            import torch.distributed as tdist
            gathered = [None] * self.dist.world if self.dist.main else None
            tdist.gather_object(rngs[0], gathered, dst=0)
            rngs = gathered
        if self.dist.main:
            from .model import PLDRForCausalLM
            if isinstance(self.model, PLDRForCausalLM) and self.dist.world == 1:
                saved = self.model
            else:  # FSDP2 shards or the reference model: a full PLDRForCausalLM to save
                with torch.device("meta"):
                    saved = PLDRForCausalLM(self.config)
                saved.load_state_dict(model_state, assign=True)
            state = {"step": step, "optimizer": optim_state,
                     "scheduler": self.scheduler.state_dict(), "rng": rngs}
            trainer = {"step": step, "settings": self.settings,
                       "data_position": self.order.position(step), "world_size": self.dist.world,
                       "parallel": self.args.parallel}
            checkpoint.save_checkpoint(self.out, step, saved, self.tokenizer, state, trainer)
        self.barrier()

    def barrier(self) -> None:
        if self.dist.world > 1:
            import torch.distributed as tdist
            tdist.barrier()

    # ---- the loop ----
    def run(self) -> int:
        initialised = False
        if self.dist.world > 1:
            import torch.distributed as tdist
            if not tdist.is_initialized():
                tdist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                initialised = True
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        try:
            self.build()
            return self.loop()
        finally:
            if initialised:
                import torch.distributed as tdist
                tdist.destroy_process_group()

    def loop(self) -> int:
        args, main = self.args, self.dist.main
        if main:
            os.makedirs(self.out, exist_ok=True)
            checkpoint.remove_partial_saves(self.out)
        metrics = Metrics(self.out, self.start if self.resumed is not None else None, main)
        tokens_per_step = args.batch_size * self.settings["seq_len"]
        if main:
            n = sum(p.numel() for p in self.model.parameters())
            print(f"{PROG}: {n / 1e6:.2f}M parameters, {len(self.packed.train)} training and "
                  f"{len(self.packed.eval)} held-out sequences of {self.settings['seq_len']} "
                  f"tokens, {self.dist.world} process(es) on {self.device}, "
                  f"{'autocast ' + str(self.autocast_dtype) if self.autocast_dtype else 'fp32'}",
                  file=sys.stderr, flush=True)
        bar = None
        if main and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=self.start, unit="step", dynamic_ncols=True,
                       desc=PROG, file=sys.stderr)
        train_time, last_eval = 0.0, None
        try:
            for step in range(self.start, args.steps):
                lr = self.scheduler.get_last_lr()[0]  # this step's
                t0 = time.perf_counter()
                loss = self.train_step(step)
                elapsed = time.perf_counter() - t0
                train_time += elapsed
                done = step + 1
                tps = tokens_per_step / elapsed
                metrics.log({"step": done, "loss": loss, "lr": lr,
                             "tokens": done * tokens_per_step, "tokens_per_s": tps})
                if bar is not None:
                    mean_tps = tokens_per_step * (done - self.start) / train_time
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{mean_tps:,.0f}", refresh=False)
                    bar.update(1)
                final = done == args.steps
                if final or (args.eval_every and done % args.eval_every == 0):
                    last_eval = self.evaluate()
                    if last_eval is not None:
                        metrics.log({"step": done, "eval_loss": last_eval})
                        if bar is not None:
                            bar.write(f"step {done}: held-out loss {last_eval:.4f}")
                    if main:
                        metrics.plot(os.path.join(self.out, CURVE_NAME))
                if final or (args.save_every and done % args.save_every == 0):
                    self.save(done)
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
        if main:
            ran = args.steps - self.start
            print(f"{PROG}: {ran} steps, {tokens_per_step * ran / max(train_time, 1e-9):,.0f} "
                  f"tokens/s; final training loss {loss:.4f}"
                  + (f", held-out {last_eval:.4f}" if last_eval is not None else "")
                  + f"; checkpoint {checkpoint.find_checkpoint(self.out)}", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
