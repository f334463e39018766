"""Fill .gpu/ for the GPU machine (no network): wheels of what its image lacks, and the embedded tokenizer.

There bench/gpu/run installs .gpu/wheels/*.whl (--no-index --no-deps --target) and reads .gpu/tokenizer. Steps:
1. the wheel set: NEEDED and what they require (markers for CPython 3.12, linux x86_64, no extras) less the
   image's packages, each pinned to the version in this venv (the tested set);
2. download them for Python 3.12 manylinux x86_64 (a pure-Python sdist is built into a wheel here), build
   orpo's wheel (for the `orpo` console script), remove every other file in .gpu/wheels;
3. save the embedded model's tokenizer; 4. measure what travels (the tree as the device tool copies it, and
   .gpu/) and stop with one line above KIT_MAX_MIB, which keeps 8 MiB of the 64 MiB the device tool carries free;
5. checks (--no-check skips): (a) the set installs for Python 3.12 tags; (b) every orpo module and the set
   import in a Python 3.11 venv with the image's versions; (c) bench/gpu/run --dry-run in that venv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".gpu" / "wheels"
TOKENIZER = ROOT / ".gpu" / "tokenizer"
LIMIT_MIB = 64  # the device tool carries the tree and .gpu up to this
KIT_MAX_MIB = 56  # tree + .gpu above this stops gpu-prepare: 8 MiB of headroom for a wheel, a notebook, a figure
# What the check's parts import that the image lacks, and nothing else (each wheel travels to every GPU run):
#   trl            bench-1b/8b's trl and trl-liger systems (TRL 1.16's ORPOTrainer)
#   bitsandbytes   the 4-bit base and paged 8-bit AdamW: tests' qlora parity, bench-8b, recipe
#   datasets       orpo train (data pipeline) and bench_train.py's workers
#   pydantic       orpo's config
#   liger-kernel   bench-1b's trl-liger system
# Not carried: lm-eval (orpo eval --lm-eval only) and gguf (orpo export and serve, and GGUF bases, imported
# lazily there: the check loads no GGUF file).
NEEDED = ["trl", "bitsandbytes", "datasets", "pydantic", "liger-kernel"]
NOT_IN_VENV = {"liger-kernel": ("0.8.5", ["torch", "triton"])}  # no CPU triton here, so not installed
# The GPU image, as read on that machine 2026-11-17: versions where known, then every package it holds.
IMAGE_FIXED = {"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0",
               "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2", "triton": "3.6.0"}
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
               "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
GPU_TAGS = ["--python-version", "3.12", "--implementation", "cp"] + [
    arg for p in ["manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17", "manylinux2014",
                  "manylinux1"] for arg in ("--platform", f"{p}_x86_64")]
# The check venv: torch==2.13.0 is the CPU build on this machine's disk (any other spec downloads CUDA);
# numpy is left to pip (the image's 2.5.2 has no Python 3.11 build); triton has no CPU build here.
CHECK_PINS = ["torch==2.13.0"] + [f"{n}=={v}" for n, v in IMAGE_FIXED.items() if n not in ("torch", "numpy", "triton")]
CHECK_ALSO = ["pytest", "hypothesis"]  # image packages the tests import, for a GPU run of tests/
IMPORT_CHECK = """
import importlib, pkgutil, sys, orpo
for m in pkgutil.walk_packages(orpo.__path__, 'orpo.'):
    importlib.import_module(m.name)
import torch, transformers, peft, trl, bitsandbytes, datasets, pydantic
from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(' '.join(f'{m.__name__} {m.__version__}' for m in (torch, transformers, peft, trl, bitsandbytes, datasets,
      pydantic)), '| orpo from', orpo.__path__[0], '| tokenizer', len(tok))
assert transformers.__version__ == '5.17.0', transformers.__version__
try:
    import liger_kernel.transformers  # noqa: F401
    print('liger_kernel imports')
except ModuleNotFoundError as e:  # triton has no CPU build here; any other missing module is a failure
    if e.name != 'triton':
        raise
    print('liger_kernel not tested: no triton here')
"""
NOT_TESTED = ["torch 2.11 + CUDA 13 (here: torch 2.13 CPU)", "Python 3.12 imports of the cp312/py312 wheels",
              "bitsandbytes' CUDA kernels", "liger-kernel (needs triton)", "the image's peft (version unknown)"]


def run(cmd: list, what: str, fatal: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run cmd quietly; on failure print it and the tail of its output, and exit 1 when fatal."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "is ignored: it is neither" not in ln]
        print(f"FAIL {what}: {' '.join(map(str, cmd))}\n  " + "\n  ".join(lines[-15:]))
        if fatal:
            sys.exit(1)
    return proc


def wheel_set() -> tuple[dict[str, str], set[str]]:
    """NEEDED and their requirements off the image, pinned to this venv: ({name: version}, image names used)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    image, pins, used, todo = {canonicalize_name(n) for n in IMAGE}, {}, set(), list(NEEDED)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pins:
            continue
        try:
            pins[name], reqs = version(name), requires(name) or []
        except PackageNotFoundError:
            if name not in NOT_IN_VENV:
                sys.exit(f"{name} is needed on the GPU machine but not installed in {sys.prefix}")
            pins[name], reqs = NOT_IN_VENV[name]
        for req in map(Requirement, reqs):
            if req.marker and not req.marker.evaluate(GPU_MARKERS):
                continue
            dep = canonicalize_name(req.name)
            fixed = IMAGE_FIXED.get(dep)
            if fixed and not req.specifier.contains(fixed, prereleases=True):
                print(f"warning: {name} {pins[name]} needs {req}; the image has {dep} {fixed}")
            (used.add if dep in image else todo.append)(dep)
    return pins, used


def wheel_key(path: Path) -> tuple[str, Version]:
    """(canonical name, version) of a wheel file."""
    name, ver, _, _ = parse_wheel_filename(path.name)
    return name, ver


def download(pins: dict[str, str]) -> None:
    """Fetch the missing pinned wheels (building pure-Python sdists here) and drop any file not in the set."""
    wanted = {(n, Version(v)) for n, v in pins.items()}
    for path in WHEELS.iterdir():
        if path.suffix != ".whl" or (wheel_key(path) not in wanted and wheel_key(path)[0] != "orpo"):
            path.unlink()
    missing = wanted - {wheel_key(p) for p in WHEELS.glob("*.whl")}
    if not missing:
        return
    print(f"downloading {len(missing)} wheels for Python 3.12 ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-deps lets pip take an sdist where a package has no wheel (rouge-score, sqlitedict, word2number)
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--prefer-binary", *GPU_TAGS, "-d", tmp,
             *[f"{n}=={v}" for n, v in sorted(missing)]], "pip download")
        for path in Path(tmp).iterdir():
            if path.suffix == ".whl":
                shutil.move(path, WHEELS / path.name)
                continue
            with tempfile.TemporaryDirectory() as out:
                run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
                     path], f"build {path.name}")
                built = next(Path(out).glob("*.whl"))
                if not built.name.endswith("-none-any.whl"):
                    sys.exit(f"{path.name} has no Python 3.12 wheel and builds only for this machine: {built.name}")
                shutil.move(built, WHEELS / built.name)


def build_orpo() -> None:
    """orpo's wheel, from a copy of the files that travel (keeps build/ and egg-info out of the tree)."""
    for old in WHEELS.glob("orpo-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for rel in tree_files():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, Path(tmp) / rel)
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", WHEELS, tmp],
            "build orpo")


def tree_files() -> list[str]:
    """The working tree's files that travel besides carried paths (tracked or untracked, not ignored)."""
    out = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], "git ls-files", cwd=ROOT)
    return [rel for rel in out.stdout.split("\0") if rel and (ROOT / rel).is_file()]


def save_tokenizer() -> None:
    """The embedded model's tokenizer; vocab.json/merges.txt dropped when tokenizer.json alone reloads the same."""
    from transformers import AutoTokenizer

    from orpo.model.builtin import builtin_model_dir

    shutil.rmtree(TOKENIZER, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    tok.save_pretrained(TOKENIZER)
    for extra in ("vocab.json", "merges.txt"):
        (TOKENIZER / extra).unlink(missing_ok=True)
    again = AutoTokenizer.from_pretrained(TOKENIZER)
    text = tok.apply_chat_template([{"role": "user", "content": "Héllo, wörld 123\n\tok?"}], tokenize=False)
    if (again(text).input_ids, len(again), again.chat_template) != (tok(text).input_ids, len(tok), tok.chat_template):
        tok.save_pretrained(TOKENIZER)  # the slow files are needed after all
    print(f"tokenizer: {', '.join(sorted(p.name for p in TOKENIZER.iterdir()))}")


def carried_bytes() -> tuple[int, int]:
    """(tree, .gpu) in bytes, as the device tool copies them: each file git tracks or would add (untracked, not
    ignored) at its size on disk now, a shared/ folder inside the checkout (it travels too), and every file in .gpu."""
    tree = {ROOT / rel for rel in tree_files()}
    if (ROOT / "shared").is_dir():
        tree |= {p for p in (ROOT / "shared").rglob("*") if p.is_file()}
    gpu = sum(p.stat().st_size for p in (ROOT / ".gpu").rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in tree), gpu


def size_table() -> None:
    """Each wheel's size, the total, the tokenizer, the tree, and tree + .gpu; exit 1 (one line) above KIT_MAX_MIB."""
    mib = 1024 * 1024
    wheels = sorted(WHEELS.glob("*.whl"), key=lambda p: -p.stat().st_size)
    for path in wheels:
        print(f"  {path.stat().st_size / mib:7.2f} MiB  {path.name}")
    total = sum(p.stat().st_size for p in wheels)
    tokenizer = sum(p.stat().st_size for p in TOKENIZER.iterdir() if p.is_file())
    tree, gpu = carried_bytes()
    print(f"  {total / mib:7.2f} MiB  {len(wheels)} wheels\n  {tokenizer / mib:7.2f} MiB  tokenizer\n"
          f"  {tree / mib:7.2f} MiB  working tree\n"
          f"  {(tree + gpu) / mib:7.2f} MiB  tree + .gpu (stops above {KIT_MAX_MIB} MiB; the device tool carries {LIMIT_MIB})")
    if tree + gpu > KIT_MAX_MIB * mib:
        sys.exit(f"tree + .gpu is {(tree + gpu) / mib:.1f} MiB ({tree / mib:.1f} tree, {gpu / mib:.1f} .gpu), over "
                 f"{KIT_MAX_MIB} MiB: {LIMIT_MIB} MiB travels and 8 stay free; drop a wheel or shrink the tree")


def check_install_312() -> bool:
    """(a) The set installs into an empty folder for the GPU machine's tags, with no index and no deps."""
    with tempfile.TemporaryDirectory() as target:
        proc = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                    "--only-binary=:all:", *GPU_TAGS, "--target", target, *sorted(WHEELS.glob("*.whl"))],
                   "(a) install for Python 3.12", fatal=False)
    if proc.returncode == 0:
        print("PASS (a) the set installs for CPython 3.12 manylinux x86_64")
    return proc.returncode == 0


def check_venv(used: set[str]) -> Path:
    """A Python 3.11 venv with the image's versions of what orpo and the set import; reused while pins hold."""
    from importlib.metadata import version

    from orpo.files import cache_root

    venv = cache_root() / "gpu-check-venv"
    py, stamp = venv / "bin" / "python", venv / "orpo-pins.txt"
    unpinned = (used | {"matplotlib", "pyyaml", "tqdm", *CHECK_ALSO}) - {"peft", *IMAGE_FIXED}
    wanted = "\n".join(sorted([*CHECK_PINS, f"peft=={version('peft')}", *unpinned]))
    if py.exists() and stamp.exists() and stamp.read_text() == wanted:
        return py
    print(f"building the check venv in {venv} (a few minutes) ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", venv], "create venv")
    run([py, "-m", "pip", "install", "-q", *wanted.split("\n")], "check venv install")
    stamp.write_text(wanted)
    return py


def install_target(py: Path, target: str) -> None:
    """The set into target for this Python; the wheels only for 3.12 are swapped for the same versions here."""
    wheels = sorted(WHEELS.glob("*.whl"))
    only_312 = [p for p in wheels if not parse_wheel_filename(p.name)[3] & set(sys_tags())]
    with tempfile.TemporaryDirectory() as tmp:
        if only_312:
            run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
                 *[f"{n}=={v}" for n, v in map(wheel_key, only_312)]], "download the 3.12-only wheels for 3.11")
        files = [p for p in wheels if p not in only_312] + sorted(Path(tmp).glob("*.whl"))
        run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--target", target,
             *files], "install the set into the check venv")


def check_imports(py: Path, env: dict) -> bool:
    """(b) Every orpo module, the set and TRL's ORPO import against the image's versions."""
    proc = run([py, "-c", IMPORT_CHECK, TOKENIZER], "(b) imports", fatal=False, env=env, cwd=ROOT)
    if proc.returncode == 0:
        print("PASS (b) imports: " + proc.stdout.strip().replace("\n", "\n  "))
    return proc.returncode == 0


def check_dry_run(py: Path, env: dict) -> bool:
    """(c) bench/gpu/run --dry-run with the check venv's interpreter."""
    script = ROOT / "bench" / "gpu" / "run"
    if not script.exists():
        print("SKIPPED (c) (bench/gpu/run not found)")
        return True
    if not os.access(script, os.X_OK):
        print("FAIL (c) bench/gpu/run is not executable")
        return False
    print("running bench/gpu/run --dry-run (about 2 minutes on 2 cores) ...", flush=True)
    with tempfile.TemporaryDirectory() as out:
        proc = run([script, "--dry-run", out], "(c) bench/gpu/run --dry-run", fatal=False,
                   env={**env, "PYTHON": str(py)}, cwd=ROOT)
    if proc.returncode == 0:
        print("PASS (c) bench/gpu/run --dry-run")
    return proc.returncode == 0


def main() -> None:
    """Steps 1-5 of the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-check", action="store_true", help="skip the checks (step 5)")
    args = parser.parse_args()
    pins, used = wheel_set()
    WHEELS.mkdir(parents=True, exist_ok=True)
    download(pins)
    build_orpo()
    save_tokenizer()
    size_table()
    if args.no_check:
        return
    ok = check_install_312()
    py = check_venv(used)
    with tempfile.TemporaryDirectory() as target:
        install_target(py, target)
        # src first, as on the GPU machine: the tree's code runs, not the wheel's copy
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{target}"}
        ok = check_imports(py, env) & check_dry_run(py, env) & ok
    print("not tested here: " + "; ".join(NOT_TESTED))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
