"""Bounded loads and atomic saves (docs/spec.md §4): a config that asks for a model its checkpoint
cannot hold is refused before anything is allocated, a load builds on the meta device and
materialises from the checkpoint (no random init), and a save killed midway leaves the old
checkpoint loadable with no temporary files."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from model_testing import needs_cpu_kernels, prompt, tiny_config, tiny_model

from pldr_kernels import PLDRConfig, PLDRForCausalLM, _io
from pldr_kernels.loaders import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD_BUDGET = 256 * 2**20  # address space a refused load may take beyond what the process has


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def address_space_budget(extra: int):
    """Let the process map at most ``extra`` more bytes (RLIMIT_AS) inside the block: a load that
    allocates the model it was asked for fails there with an allocation error."""
    resource = pytest.importorskip("resource")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux) to set a memory budget")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---- the size a config asks for -------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    dict(), dict(tie_word_embeddings=True), dict(attention_bias=False, final_bias=False),
    dict(glu_bias=False, num_denseA=3, A_dff=7), dict(custom_G_type="identity"),
    dict(custom_G_type="random", tie_word_embeddings=True)], ids=str)
def test_state_dict_numel_counts_the_models_state(fields):
    config = tiny_config(**fields)
    with torch.device("meta"):
        model = PLDRForCausalLM(config)
    assert config.state_dict_numel() == sum(v.numel() for v in model.state_dict().values())


# ---- bounded loads ----------------------------------------------------------------------------
HUGE = [("num_hidden_layers", 10**9), ("A_dff", 10**7), ("vocab_size", 10**8),
        ("intermediate_size", 10**9), ("num_reslayerA", 10**6)]


@pytest.mark.parametrize("field, value", HUGE)
def test_huge_config_for_a_small_checkpoint_is_refused_before_allocation(tmp_path, field, value):
    """The issue's reproducer: a few-hundred-byte config.json asking for 10⁹ layers ran unbounded,
    A_dff = 10⁷ ran a minute and ran out of memory. Now both end with a CheckpointError within a
    256 MiB memory budget (building either model would need gigabytes)."""
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with address_space_budget(LOAD_BUDGET), pytest.raises(CheckpointError) as info:
        PLDRForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(path) in message and f"{field}={value}" in message and "refusing to build" in message


def test_huge_config_for_a_pth_is_refused_before_allocation(tmp_path):
    tiny_model().save_pth(tmp_path / "m.pth")
    config = tiny_config(num_hidden_layers=10**9)
    with address_space_budget(LOAD_BUDGET), pytest.raises(CheckpointError,
                                                          match="num_hidden_layers=1000000000"):
        PLDRForCausalLM.from_pth(tmp_path / "m.pth", config=config)


def test_expanded_tensors_count_what_the_file_holds(tmp_path):
    """A stride-0 tensor holds one element however large its shape: it cannot vouch for a model
    of that size."""
    config = tiny_config(num_hidden_layers=10**4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PLDRForCausalLM(tiny_config()).state_dict().items()}
    fake = {k: torch.zeros(1).expand(10**7) for k in shapes}  # claims 10⁷ elements per key
    torch.save({"model_state_dict": fake}, tmp_path / "expanded.pth")
    with address_space_budget(LOAD_BUDGET), pytest.raises(CheckpointError,
                                                          match="refusing to build"):
        PLDRForCausalLM.from_pth(tmp_path / "expanded.pth", config=config)


def test_shapes_are_checked_before_any_weight_is_read(tmp_path, monkeypatch):
    """A checkpoint with a mis-shaped key is refused from its header: no tensor data is read, no
    weight is initialised, and the message lists the key."""
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "A_dff": 160}))
    read = []
    real_safe_open, real_load_file = safetensors.safe_open, safetensors.torch.load_file

    class SpyingSafeOpen:
        """safe_open that records every tensor whose data is read."""

        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_slice(self, key):
            return self.file.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self.file.get_tensor(key)

    def load_file(*args, **kwargs):
        read.append("load_file: every tensor")
        return real_load_file(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", SpyingSafeOpen)
    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=r"gluw1.weight: checkpoint \(170, 64\) vs model "
                                              r"\(160, 64\)"):
        PLDRForCausalLM.from_pretrained(tmp_path)
    assert read == [] and torch.equal(torch.get_rng_state(), rng)


@needs_cpu_kernels
@pytest.mark.parametrize("fields", [dict(), dict(tie_word_embeddings=True),
                                    dict(custom_G_type="random")], ids=str)
def test_load_materialises_the_checkpoint_without_random_init(tmp_path, fields):
    """The model is built on the meta device: loading draws nothing from the global RNG, ties
    stay tied, the packed weights are views of the loaded values and the logits are the saved
    model's, bit for bit."""
    model = tiny_model(seed=5, **fields)
    model.save_pretrained(tmp_path / "hf")
    model.save_pth(tmp_path / "m.pth")
    ids = prompt(12, seed=1)
    with torch.no_grad():
        want = model(ids).logits
    for load in (lambda: PLDRForCausalLM.from_pretrained(tmp_path / "hf"),
                 lambda: PLDRForCausalLM.from_pth(tmp_path / "m.pth", config=model.config)):
        torch.manual_seed(1234)
        rng = torch.get_rng_state()
        loaded = load()
        assert torch.equal(torch.get_rng_state(), rng), "loading drew random numbers (an init)"
        assert _same_state(model, loaded)
        assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
        assert all(p.requires_grad for p in loaded.parameters())
        tied = loaded.final_layer.weight is loaded.decoder.embedding.weight
        assert tied == loaded.config.tie_word_embeddings
        ffn = loaded.decoder.dec_layers[0].ffn
        assert ffn.gluw1.weight.data_ptr() == ffn.packs["w12"].packed.data_ptr()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)


# ---- atomic saves -----------------------------------------------------------------------------
def _no_temporaries(directory) -> bool:
    return not [n for n in os.listdir(directory) if _io.TEMP_MARK in n]


def _interrupt_save_file(monkeypatch, when: str):
    """Make safetensors' save_file stop like a killed process: after writing half of its file, or
    after writing all of it (before the config)."""
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if when == "mid-weights":
            with open(filename, "wb") as f:
                f.write(b"\x00" * 1000)
        else:
            real(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt(f"killed {when}")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("when", ["mid-weights", "after-weights"])
def test_interrupted_save_pretrained_leaves_the_old_checkpoint(tmp_path, monkeypatch, when):
    """The issue: a kill during a save over an existing checkpoint left the new config.json with
    the old weights. Now nothing is replaced until every file is written."""
    old = tiny_model(seed=1)
    old.save_pretrained(tmp_path)
    _interrupt_save_file(monkeypatch, when)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(seed=2, num_hidden_layers=1).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert _same_state(PLDRForCausalLM.from_pretrained(tmp_path), old)


def test_interrupted_save_pth_leaves_the_old_file(tmp_path, monkeypatch):
    old = tiny_model(seed=1)
    old.save_pth(tmp_path / "m.pth")
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real({"model_state_dict": {}}, f)  # a file that does not load as the model
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(seed=2).save_pth(tmp_path / "m.pth")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.pth"]
    assert _same_state(PLDRForCausalLM.from_pth(tmp_path / "m.pth", config=old.config), old)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    from model_testing import tiny_model

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\\x00" * 1000)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_file
    tiny_model(seed=2, num_hidden_layers=1).save_pretrained({directory!r})
""")


def test_save_pretrained_killed_by_sigkill_leaves_the_old_checkpoint(tmp_path):
    """A real kill (no cleanup runs): the old checkpoint still loads; the partial temporary file
    is left, hidden, next to it."""
    old = tiny_model(seed=1)
    old.save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    script = KILLED_SAVE.format(root=ROOT, directory=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert _same_state(PLDRForCausalLM.from_pretrained(tmp_path), old)
    left = sorted(set(os.listdir(tmp_path)) - {"config.json", "model.safetensors"})
    assert all(n.startswith(".model.safetensors" + _io.TEMP_MARK) for n in left), left


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc (Linux)")
def test_atomic_write_all_commits_in_order_after_every_file_is_written(tmp_path, monkeypatch):
    events = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(source, target):
        events.append(("replace", os.path.basename(target)))
        real_replace(source, target)

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", "temp" if _io.TEMP_MARK in name else name))
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)

    def writer(name):
        def write(temp):
            events.append(("write", name))
            assert temp.endswith(os.path.splitext(name)[1]) and _io.TEMP_MARK in temp
            with open(temp, "w") as f:
                f.write(name)
        return write

    _io.atomic_write_all([(tmp_path / "w.safetensors", writer("w.safetensors")),
                          (tmp_path / "c.json", writer("c.json"))])
    assert events == [("write", "w.safetensors"), ("fsync", "temp"), ("write", "c.json"),
                     ("fsync", "temp"), ("replace", "w.safetensors"), ("replace", "c.json"),
                     ("fsync", tmp_path.name)]
    assert (tmp_path / "c.json").read_text() == "c.json" and _no_temporaries(tmp_path)


def test_atomic_write_failure_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")

    def failing(temp):
        with open(temp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write(target, failing)
    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write(tmp_path / "new.json", failing)
    assert os.listdir(tmp_path) == ["run.json"] and target.read_text() == "old"


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    old_umask = os.umask(0o022)
    try:
        _io.atomic_write_text(tmp_path / "a.md", "x")
        with open(tmp_path / "b.md", "w") as f:
            f.write("x")
    finally:
        os.umask(old_umask)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.md").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.md").st_mode) == 0o644


def test_loader_ignores_a_killed_saves_temporary(tmp_path):
    """What a SIGKILL leaves (a hidden partial file) does not disturb the next load or save."""
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    (tmp_path / f".model.safetensors{_io.TEMP_MARK}dead.safetensors").write_bytes(b"\x00" * 10)
    model.save_pretrained(tmp_path)
    assert _same_state(PLDRForCausalLM.from_pretrained(tmp_path), model)


def test_config_bounds_are_checked_with_the_file_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    fields = json.loads(path.read_text())
    for field, value, expected in (("layer_norm_eps", float("inf"), "layer_norm_eps must be a "
                                                                      "finite number > 0"),
                                   ("rope_theta", -1.0, "rope_theta must be a finite number > 0"),
                                   ("tie_word_embeddings", "no", "tie_word_embeddings must be "
                                                                  "True or False")):
        path.write_text(json.dumps({**fields, field: value}))
        with pytest.raises(CheckpointError) as info:
            PLDRForCausalLM.from_pretrained(tmp_path)
        assert str(path) in str(info.value) and expected in str(info.value), info.value
    assert PLDRConfig.from_dict(fields) == tiny_config()
