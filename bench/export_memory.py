"""Peak memory of `orpo export` on a Llama-3-8B-shaped model: bytes per parameter, measured.

Builds the model folder without ever holding the model: config.json of Llama 3 8B (32 layers, hidden 4096, 32
heads, 8 key/value heads, MLP 14336, vocabulary 128256), the embedded SmolLM2 tokenizer and its ChatML template
(its 49152 tokens; the other rows are padding entries in the file), and random bf16 safetensors shards written
one tensor at a time (16 GB on disk). Then runs `orpo export FOLDER --gguf OUT --type TYPE` as a child process
and reads its peak RSS (getrusage of the children: the whole export, check included: the source model run layer
by layer, the file read back, llama.cpp on the file).

    .venv/bin/python bench/export_memory.py [--work /tmp/export8b] [--type f16] [--layers 32]

Needs about 2 x 16 GB of disk for f16 (shards + file); prints a markdown row and writes the figures to
bench/results/export_memory.json. The model folder and the file are deleted at the end unless --keep."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch


def llama3_8b(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """A safetensors file of random bf16 tensors, each made and written in turn (one tensor in memory)."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
            f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def build(folder: Path, layers: int) -> int:
    from transformers import AutoTokenizer

    from orpo.after.weights import meta_shapes
    from orpo.model.builtin import builtin_model_dir

    config = llama3_8b(layers)
    shapes = meta_shapes(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(builtin_model_dir()).save_pretrained(folder)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():  # shards of about 2 GB, as transformers writes them
        n = 2 * int(torch.tensor(shape).prod())
        if current and size + n > 2 * 2**30:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_shard(folder / file, group, seed=i)
        weight_map.update({name: file for name, _ in group})
        print(f"  {file}: {len(group)} tensors", flush=True)
    total = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/export8b")
    parser.add_argument("--type", default="f16")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    folder, out = work / "model", work / f"model.{args.type}.gguf"
    started = time.perf_counter()
    params = build(folder, args.layers)
    built = time.perf_counter() - started
    print(f"built {folder}: {params / 1e9:.2f} B parameters in {built:.0f} s", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orpo.cli", "export", str(folder), "--gguf", str(out), "--type", args.type, "--force"])
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    row = {"model": f"Llama-3-8B-shaped ({args.layers} layers, random bf16 shards)", "parameters": params, "type": args.type,
           "exit_code": done.returncode, "export_seconds": round(seconds), "peak_rss_bytes": peak,
           "bytes_per_parameter": round(peak / params, 3), "file_bytes": out.stat().st_size if out.exists() else None}
    print(f"| {row['model']} | {params / 1e9:.2f} B | {args.type} | exit {done.returncode} | {seconds / 60:.1f} min | "
          f"{peak / 2**30:.2f} GiB | {row['bytes_per_parameter']} bytes/parameter |")
    results = Path(__file__).parent / "results" / "export_memory.json"
    results.write_text(json.dumps(row, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
