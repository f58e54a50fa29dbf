"""The installed package: the extension loads, ops are registered, the build report is truthful, and
each way of not having a working build is named, with what to do, as a newcomer meets it."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pldr_kernels
from pldr_kernels import ops

OPS = ("metric_tensors", "g_attention", "g_attention_decode")
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(pldr_kernels.__file__).resolve().parent
needs_build = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")


@needs_build
def test_extension_loaded_and_ops_registered():
    ops.require_built()
    for op in OPS:
        assert hasattr(torch.ops.pldr, op)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CPU"), op


@needs_build
def test_cuda_key_always_has_a_kernel_or_rebuild_hint():
    # Real CUDA kernels in a CUDA build; otherwise a stub whose error says how to rebuild.
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CUDA"), op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_only_build_says_how_to_rebuild_on_cuda_tensors():
    if ops.built_with_cuda():
        pytest.skip("this build has CUDA kernels")
    # (g_attention runs the Triton forward there instead, docs/design.md §3.7; decode has none)
    q = torch.randn(1, 4, 1, 64, device="cuda")
    seqlens = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*Rebuild"):
        pldr_kernels.g_attention_decode(q, q, q, seqlens)


@needs_build
def test_build_report_runs_and_names_every_op():
    run = subprocess.run([sys.executable, "-m", "pldr_kernels"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.startswith(f"pldr-kernels {pldr_kernels.__version__} ({PACKAGE})")
    assert "torch" in out and "cuda kernels" in out
    for op in OPS:
        assert f"pldr::{op}" in out and "CPU" in out.split(f"pldr::{op}")[1].splitlines()[0]


@needs_build
def test_loaded_wrappers_are_the_plain_functions():
    # The decode hot path: no stand-in, no check layered on the wrapper when _C loaded.
    for op in OPS:
        assert not hasattr(getattr(ops, op), "__wrapped__"), op


# ---- one version, declared dependencies --------------------------------------------------------
def setup_py_calls() -> dict[str, ast.expr]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def test_version_has_one_source():
    version = setup_py_calls()["version"]
    assert isinstance(version, ast.Call) and version.func.id == "read_version", \
        "setup.py must take the version from pldr_kernels/_version.py"
    namespace: dict = {}
    exec((PACKAGE / "_version.py").read_text(), namespace)
    assert pldr_kernels.__version__ == namespace["__version__"]


def requirement_names(requirements: list[str]) -> set[str]:
    return {req.split(";")[0].split("[")[0].strip().split("<")[0].split(">")[0].split("=")[0]
            .strip() for req in requirements}


def third_party_imports(files) -> set[str]:
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "pldr_kernels"}


def test_every_import_of_the_package_is_a_declared_dependency():
    kwargs = setup_py_calls()
    install = requirement_names(ast.literal_eval(kwargs["install_requires"]))
    extras = {k: requirement_names(v)
              for k, v in ast.literal_eval(kwargs["extras_require"]).items()}
    # triton_kernels/__init__.py is core (imported by pldr_kernels); its kernels need the extra
    # python -m pldr_kernels reads triton's version only when triton_available() says it is there
    triton_kernels = [PACKAGE / "triton_kernels" / "attention.py", PACKAGE / "__main__.py"]
    # text in, text out: sentencepiece (the text extra); pldr-inspect --plot: matplotlib (bench's)
    text = [PACKAGE / name for name in ("tokenizer.py", "textgen.py", "inspection.py")]
    text += list((PACKAGE / "cli").rglob("*.py"))
    train = [PACKAGE / "train.py"]  # pldr-train: the train extra
    core = [p for p in PACKAGE.rglob("*.py")
            if not {"bench", "hf"} & set(p.relative_to(PACKAGE).parts)
            and p not in triton_kernels and p not in text and p not in train]
    allowed = install | extras["train"]
    assert third_party_imports(train) <= allowed, third_party_imports(train) - allowed
    allowed = install | extras["text"] | extras["bench"]
    assert third_party_imports(text) <= allowed, third_party_imports(text) - allowed
    bench = list((PACKAGE / "bench").rglob("*.py"))
    assert third_party_imports(core) <= install, third_party_imports(core) - install
    allowed = install | extras["bench"] | extras["hf"]  # the hf and llama suites: the [hf] extra
    assert third_party_imports(bench) <= allowed, third_party_imports(bench) - allowed
    allowed = install | extras["triton"]
    assert third_party_imports(triton_kernels) <= allowed, (
        third_party_imports(triton_kernels) - allowed)
    # pldr_kernels.hf needs the [hf] extra; its lm-eval entry point the [eval] one
    evaluate = [PACKAGE / "hf" / "evaluate.py"]
    hf = [p for p in (PACKAGE / "hf").rglob("*.py") if p not in evaluate]
    allowed = install | extras["hf"]
    assert third_party_imports(hf) <= allowed, third_party_imports(hf) - allowed
    allowed = install | {name.replace("-", "_") for name in extras["eval"]}
    assert third_party_imports(evaluate) <= allowed, third_party_imports(evaluate) - allowed


# ---- what a newcomer sees when the build is missing or does not fit --------------------------
def copy_package(dest: Path, with_extension: bool) -> Path:
    """A copy of the package (sources, _build_info, and the built _C if asked) under ``dest``."""
    target = dest / "pldr_kernels"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "_C*.so",
                                                                   "_C*.pyd"))
    if with_extension:
        for so in PACKAGE.glob("_C*.so"):
            shutil.copy(so, target / so.name)
    return target


def set_built_with_torch(package: Path, version: str) -> None:
    info = dict(ops.build_info()) or {"with_cuda": False}
    info["built_with_torch"] = version
    (package / "_build_info.py").write_text(f"BUILD_INFO = {info!r}\n")


def run_python(cwd: Path, *args: str, pythonpath: Path | None = None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


CALL_AN_OP = ("import torch, pldr_kernels\n"
              "q = torch.randn(1, 4, 1, 64)\n"
              "try:\n"
              "    pldr_kernels.g_attention(q, q, q)\n"
              "except RuntimeError as exc:\n"
              "    print('RuntimeError:', exc)\n"
              "else:\n"
              "    print('ran')\n")


def test_an_installation_without_the_extension_says_so(tmp_path):
    package = copy_package(tmp_path, with_extension=False)
    run = run_python(tmp_path, "-c", CALL_AN_OP)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"RuntimeError: pldr_kernels._C is missing from {package}")
    assert "pip install --no-build-isolation ." in run.stdout
    assert "circular import" not in run.stdout

    report = run_python(tmp_path, "-m", "pldr_kernels")
    assert report.returncode == 1
    assert "extension     NOT LOADED: pldr_kernels._C is missing from" in report.stdout


@needs_build
def test_the_source_tree_shadowing_the_installed_package_is_named(tmp_path):
    installed = copy_package(tmp_path / "site-packages", with_extension=True)
    repo = tmp_path / "repo"
    source = copy_package(repo, with_extension=False)
    (repo / "setup.py").write_text("")
    (repo / "csrc").mkdir()
    run = run_python(repo, "-c", CALL_AN_OP, pythonpath=installed.parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(
        f"RuntimeError: pldr_kernels was imported from the source tree {source}, where the "
        "extension (_C) is not built.")
    assert f"shadows the installed one at {installed}" in run.stdout
    assert "Run Python from another directory" in run.stdout
    assert f"`pip install --no-build-isolation -e .` (or `make build`) in {repo}" in run.stdout
    # ... and from elsewhere the installed copy is the one that runs
    elsewhere = run_python(tmp_path, "-c", CALL_AN_OP, pythonpath=installed.parent)
    assert elsewhere.stdout == "ran\n", elsewhere.stdout + elsewhere.stderr


def test_a_build_against_another_torch_that_does_not_load_is_named(tmp_path):
    package = copy_package(tmp_path, with_extension=False)
    (package / "_C.abi3.so").write_bytes(b"not a shared object")  # as an undefined symbol would
    set_built_with_torch(package, "9.9.9+cu999")
    run = run_python(tmp_path, "-c", CALL_AN_OP)
    assert run.stdout.startswith(
        f"RuntimeError: pldr_kernels was built against torch 9.9.9+cu999 but torch "
        f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation .`")
    report = run_python(tmp_path, "-m", "pldr_kernels")
    assert report.returncode == 1 and "built against torch 9.9.9+cu999" in report.stdout


@needs_build
def test_a_build_against_another_torch_that_loads_warns_once(tmp_path):
    package = copy_package(tmp_path, with_extension=True)
    set_built_with_torch(package, "9.9.9+cu999")
    run = run_python(tmp_path, "-W", "always", "-c",
                     "import pldr_kernels, pldr_kernels.ops\n" + CALL_AN_OP)
    assert run.stdout == "ran\n", run.stdout + run.stderr
    warning = (f"RuntimeWarning: pldr_kernels was built against torch 9.9.9+cu999 but torch "
               f"{torch.__version__} is installed")
    assert run.stderr.count(warning) == 1, run.stderr
    report = run_python(tmp_path, "-m", "pldr_kernels")
    assert "WARNING       pldr_kernels was built against torch 9.9.9+cu999" in report.stdout
