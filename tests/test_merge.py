"""`orpo merge`: merged logits equal the adapter model's (ChatML rows included); the streamed writer equals the in-memory
merge (sharded, tied); files, generation config; the check holds one model at a time, in fp32 arithmetic."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from conftest import PAIRS, tiny_overrides, write_jsonl
from orpo.after import merge
from orpo.after.card import finish_run
from orpo.cli import main
from orpo.config import load_config
from orpo.training.loop import train


@pytest.fixture(scope="module")
def chatml_run(base_model_dir, tmp_path_factory):
    """A LoRA run on a model without a chat template: ChatML tokens added, their rows trained."""
    tmp = tmp_path_factory.mktemp("merge")
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS * 4)
    out = tmp / "run"
    train(load_config(None, tiny_overrides(base_model_dir, data, out, max_steps=2, learning_rate=0.05, eval_on_start="false", eval_steps="null")), finish=finish_run)
    return out


@pytest.fixture(scope="module")
def tied_chatml_run(tied_base_model_dir, tmp_path_factory):
    """A LoRA run on a tied model without a chat template: the ChatML rows live in the shared embeddings."""
    tmp = tmp_path_factory.mktemp("merge_tied")
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS * 4)
    out = tmp / "run"
    train(load_config(None, tiny_overrides(tied_base_model_dir, data, out, max_steps=2, learning_rate=0.05, eval_on_start="false", eval_steps="null")), finish=finish_run)
    return out


def in_memory_only(monkeypatch):
    """Make after.weights refuse to stream an adapter run: merge_run takes the in-memory path (peft's
    merge_and_unload, then save_pretrained), the way every merge was written before streaming."""
    from orpo.after import weights

    def refuse(*args, **kwargs):
        raise weights.NotStreamable("the test asks for the in-memory path")

    monkeypatch.setattr(weights, "adapter_weights", refuse)


def tensors(folder):
    """name -> tensor of every safetensors shard in a model folder."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}


def folder_files(folder):
    """The folder's files with their JSON read (the weights compared apart)."""
    return {p.name: json.loads(p.read_text()) if p.suffix == ".json" else p.read_bytes()
            for p in folder.iterdir() if p.suffix != ".safetensors"}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("which", ["chatml_run", "tied_chatml_run"])
def test_streamed_merge_equals_the_in_memory_merge(request, tmp_path, monkeypatch, caplog, which, dtype):
    """The streamed merge writes what peft's merge_and_unload + save_pretrained wrote, tensor for tensor and
    bit for bit (both round once from the same fp32 merge), and the same config.json, generation_config.json
    (eos = end of turn), tokenizer and run config; a tied output layer is not written."""
    run = request.getfixturevalue(which)
    with caplog.at_level("WARNING", logger="orpo.after.weights"):
        streamed = merge.merge_run(run, dtype, tmp_path / "streamed")
    assert "loading the whole model" not in caplog.text
    in_memory_only(monkeypatch)
    with caplog.at_level("WARNING", logger="orpo.after.weights"):
        in_memory = merge.merge_run(run, dtype, tmp_path / "in_memory")
    assert "loading the whole model in fp32 (the test asks for the in-memory path)" in caplog.text

    got, want = tensors(streamed), tensors(in_memory)
    assert got.keys() == want.keys() and [p.name for p in streamed.glob("*.safetensors")] == ["model.safetensors"]
    for name, tensor in got.items():
        assert tensor.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], name
        assert torch.equal(tensor, want[name]), name
    assert folder_files(streamed) == folder_files(in_memory)
    config = json.loads((streamed / "config.json").read_text())
    assert config["dtype"] == merge.DTYPES[dtype] and config["tie_word_embeddings"] is (which == "tied_chatml_run")
    assert ("lm_head.weight" in got) is (which == "chatml_run")


def test_sharded_merge_loads_and_equals_the_unsharded_one(chatml_run, tmp_path):
    """max_shard_size 20KB: the shards and index are laid out as transformers' save_pretrained lays out the same
    model (file names, index metadata, the names the weight_map covers; which tensors share a shard may differ:
    transformers 5 sorts Llama's names first), no shard holds more than 20 KB of tensors unless it holds one
    tensor, and from_pretrained loads the same model as from the single file."""
    from transformers import AutoModelForCausalLM

    from orpo.after.weights import Shards

    sharded = merge.merge_run(chatml_run, "bf16", tmp_path / "sharded", max_shard_size="20KB")
    single = merge.merge_run(chatml_run, "bf16", tmp_path / "single")
    theirs = tmp_path / "theirs"
    AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16).save_pretrained(theirs, max_shard_size="20KB")

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    their_index = json.loads((theirs / "model.safetensors.index.json").read_text())
    assert index["metadata"] == their_index["metadata"] and index["weight_map"].keys() == their_index["weight_map"].keys()
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert files == sorted(p.name for p in theirs.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:
        shards = Shards([sharded / file])
        sizes = [math.prod(shards.shape(n)) * 2 for n in shards.names()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1, file
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors(single).values())

    a = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    b = AutoModelForCausalLM.from_pretrained(single).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_merge_writes_no_output_layer_and_loads_tied(tied_chatml_run, tmp_path):
    """A tied model's merge writes the embeddings once (as transformers does); loaded, the output layer is the
    merged embedding matrix, trained ChatML rows included."""
    from transformers import AutoModelForCausalLM

    out = merge.merge_run(tied_chatml_run, "fp32", tmp_path / "merged")
    assert "lm_head.weight" not in tensors(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, tensors(out)["model.embed_tokens.weight"])


def test_merge_docstring_says_what_the_memory_is():
    doc = " ".join(merge.__doc__.split())
    assert "written one tensor at a time" in doc and "Memory: one tensor in fp32" in doc
    assert "one model in memory at a time" in doc and "2 bytes per parameter" in doc


def test_check_holds_one_model_at_a_time(chatml_run, tmp_path, monkeypatch):
    """When the merged model loads (the second from_pretrained; the first is the adapter model's base), no
    adapter model is alive any more: it was freed, not merely unnamed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge.merge_run(chatml_run, "bf16", tmp_path / "merged")
    alive = []
    load = AutoModelForCausalLM.from_pretrained

    def watched(*args, **kwargs):
        alive.append(sum(issubclass(type(o), PeftModel) for o in gc.get_objects()))  # type(): no attribute lookups
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", watched)
    gc.disable()  # nothing but the check itself frees it
    try:
        assert merge.check_merge(chatml_run, out, "bf16").passed
    finally:
        gc.enable()
    assert len(alive) == 2 and alive[1] == 0


def test_check_above_the_limit_loads_16_bit_and_computes_in_fp32(chatml_run, tmp_path, monkeypatch, capsys):
    """Over FP32_CHECK_MAX_PARAMS both models load in the merged dtype and run in fp32 arithmetic: the check
    passes with the same tolerance, and says so in its line and in orpo_merge.json."""
    from transformers import AutoModelForCausalLM

    dtypes = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: dtypes.append(k.get("dtype")) or load(*a, **k))
    monkeypatch.setattr(merge, "FP32_CHECK_MAX_PARAMS", 0)
    out = tmp_path / "merged"
    assert main(["merge", str(chatml_run), "--dtype", "bf16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(over 0e+00 parameters: weights in bf16, computed in fp32): max |diff|" in text and "PASS" in text
    assert json.loads((out / "orpo_merge.json").read_text())["weights_dtype"] == "bf16"
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the base under the adapter, then the merged model


def test_fp32_arithmetic_gives_the_fp32_models_logits(chatml_run, tmp_path):
    """A bf16 model run through fp32_arithmetic gives the logits of the same weights loaded in fp32, bit for
    bit, and keeps its bf16 tensors (the very same storage) afterwards."""
    from transformers import AutoModelForCausalLM

    from orpo.after.runs import prompt_logits
    from orpo.model.load import load_tokenizer

    out = merge.merge_run(chatml_run, "bf16", tmp_path / "merged")
    tokenizer, _ = load_tokenizer(load_config(out / "orpo_config.yaml"))
    want = prompt_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), tokenizer, merge.PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    with merge.fp32_arithmetic(model):
        got = prompt_logits(model, tokenizer, merge.PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    bf16 = prompt_logits(model, tokenizer, merge.PROMPTS)  # the hooks are gone: bf16 arithmetic again
    assert not all(torch.equal(a, b) for a, b in zip(want, bf16, strict=True))


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-4), ("bf16", None)])
def test_merge_matches_the_adapter_model(chatml_run, tmp_path, capsys, dtype, tolerance):
    out = tmp_path / f"merged-{dtype}"
    assert main(["merge", str(chatml_run), "--dtype", dtype, "--out", str(out), "--max-shard-size", "20KB"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "max |diff|" in text
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "orpo_config.yaml").is_file() and (out / "chat_template.jinja").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == im_end
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    check = json.loads((out / "orpo_merge.json").read_text())
    assert check["passed"] and check["adapter_effect"] > 10 * check["max_abs_diff"]
    if tolerance:
        assert check["max_abs_diff"] < tolerance


@pytest.mark.parametrize("path", ["streamed", "in memory"])
def test_merge_fails_loudly_when_the_weights_do_not_match(chatml_run, tmp_path, monkeypatch, capsys, path):
    """A merge that loses the LoRA delta must give FAIL and exit status 1, streamed (lora_B read as zeros) or
    in memory (peft's merge_and_unload replaced by unload)."""
    from peft.tuners.tuners_utils import BaseTuner

    from orpo.after.weights import Shards

    if path == "streamed":
        read = Shards.read
        monkeypatch.setattr(Shards, "read", lambda self, name: read(self, name) * (0 if ".lora_B." in name else 1))
    else:
        in_memory_only(monkeypatch)
        monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())
    assert main(["merge", str(chatml_run), "--dtype", "fp32", "--out", str(tmp_path / "bad")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_merge_needs_a_run(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 1
    assert "is not a model folder (no config.json), a run folder (config.yaml + final/)" in capsys.readouterr().err


def test_qlora_run_merges_into_a_16_bit_base(wide_model_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    run = tmp_path / "q"
    train(load_config(None, tiny_overrides(wide_model_dir, data, run, max_steps=1, eval_on_start="false", eval_steps="null", **{
        "model.load_in_4bit": "true", "model.bnb_4bit_compute_dtype": "float32"})), finish=finish_run)
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--dtype", "fp16", "--out", str(out)]) == 0
    assert "PASS" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16 and not any("4bit" in type(m).__name__ for m in model.modules())


def test_bf16_merge_rounds_each_weight_once(chatml_run, tmp_path, capsys):
    """Every merged bf16 weight is the fp32 merge rounded once to bf16 (merging in bf16 would round the fp32
    base, then the sum), and the check states its tolerance: 4 x bf16 eps = 2^-5 of the largest logit."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from orpo.model.load import load_base, load_tokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(chatml_run), "--dtype", "bf16", "--out", str(out)]) == 0
    assert "= 0.03125 x max |logit|" in capsys.readouterr().out
    config = load_config(chatml_run / "config.yaml")
    tokenizer, new_ids = load_tokenizer(config)
    base = load_base(config, tokenizer, new_ids, dtype=torch.float32, quantized=False)
    want = PeftModel.from_pretrained(base, chatml_run / "final").merge_and_unload().to(torch.bfloat16).state_dict()
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() <= want.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
