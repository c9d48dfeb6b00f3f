"""save_hf: HF -> msjax -> HF round trip, transformers reloads, sharding, bf16, atomicity."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tiny_hf import build_hf, msjax_forward, sprm_sequential, write_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import msjax.hf.export as export_mod
from msjax.hf import load_hf, parse_size, save_hf
from msjax.sharding import make_mesh

TOKENS = np.random.RandomState(1).randint(0, 64, (2, 7)).astype(np.int32)
DIMS = dict(hidden=32, heads=4, kv_heads=2, intermediate=64, layers=3)


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """An untied HF folder with score_module.pt, tokenizer files and an EOS list."""
    path = tmp_path_factory.mktemp("src")
    model, head = build_hf(path, **DIMS, seed=3)
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    msjax_model, _ = load_hf(path)
    return path, _torch_logits(model), head, msjax_model


@pytest.fixture(scope="module")
def exported(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "hf"
    save_hf(src[3], out, tokenizer_dir=src[0])
    return out


def test_round_trip_tensors_are_bit_identical(src, exported):
    a = load_file(str(src[0] / "model.safetensors"))
    b = load_file(str(exported / "model.safetensors"))
    assert sorted(a) == sorted(b) and "lm_head.weight" in b
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not (exported / "model.safetensors.index.json").exists()


def test_transformers_loads_export_and_logits_match(src, exported):
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    logits = _torch_logits(model)
    np.testing.assert_array_equal(logits, src[1])  # identical weights, identical torch math
    np.testing.assert_allclose(msjax_forward(src[3], TOKENS)[0], logits, atol=1e-4, rtol=0)
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["dtype"] == "float32"
    assert cfg["torch_dtype"] == "float32" and cfg["eos_token_id"] == [1, 3]


def test_head_loads_strictly_into_the_original_sequential(src, exported):
    state = torch.load(exported / "score_module.pt", weights_only=True)
    assert list(state) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    seq = sprm_sequential(32, seed=99)
    seq.load_state_dict(state, strict=True)
    for k, v in src[2].state_dict().items():
        torch.testing.assert_close(seq.state_dict()[k], v, rtol=0, atol=0)


def test_tokenizer_and_generation_config_travel(src, exported):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / name).read_bytes() == (src[0] / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.convert_tokens_to_ids(".\n\n") == 4 and tok.eos_token == "<eos>"


def test_reimport_of_export_gives_the_same_parameters(src, exported):
    again, _ = load_hf(exported)
    np.testing.assert_array_equal(msjax_forward(again, TOKENS)[0], msjax_forward(src[3], TOKENS)[0])


def test_export_from_a_model_sharded_on_a_mesh(src, tmp_path):
    sharded, _ = load_hf(src[0], mesh=make_mesh((2, 2, 2)))
    out = save_hf(sharded, tmp_path / "from_mesh")
    a = load_file(str(src[0] / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sharded_export_loads_in_transformers(src, tmp_path):
    out = save_hf(src[3], tmp_path / "sharded", shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(os.listdir(out)) == sorted(
        files
        + ["config.json", "generation_config.json", "model.safetensors.index.json"]
        + ["score_module.pt"]
    )
    sizes = [sum(t.nbytes for t in load_file(str(out / f)).values()) for f in files]
    assert max(sizes[:-1]) <= 20_000 and index["metadata"]["total_size"] == sum(sizes)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(_torch_logits(model), src[1])


def test_bf16_export_rounds_like_torch(src, tmp_path):
    out = save_hf(src[3], tmp_path / "bf16", dtype="bfloat16")
    a = load_file(str(src[0] / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    for k in a:
        assert b[k].dtype == ml_dtypes.bfloat16
        ref = torch.from_numpy(a[k]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(b[k].astype(np.float32), ref, err_msg=k)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    assert np.abs(_torch_logits(model) - src[1]).max() < 0.1 * np.abs(src[1]).max()


def test_tied_export_has_no_lm_head_and_loads(tmp_path):
    model, _ = build_hf(tmp_path / "tied", **DIMS, tied=True, seed=4)
    ours, cfg = load_hf(tmp_path / "tied")
    out = save_hf(ours, tmp_path / "out")
    assert cfg.tie_word_embeddings and "lm_head.weight" not in load_file(
        str(out / "model.safetensors")
    )
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(_torch_logits(again), _torch_logits(model))


def test_crash_mid_export_leaves_no_folder_and_no_temp(src, tmp_path, monkeypatch):
    calls = []
    real = export_mod.save_file

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export_mod, "save_file", failing)
    with pytest.raises(OSError, match="simulated"):
        save_hf(src[3], tmp_path / "out", shard_size="20KB")
    assert len(calls) == 2 and os.listdir(tmp_path) == []


def test_existing_folder_needs_overwrite(src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(src[3], tmp_path / "out")
    save_hf(src[3], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file() and os.listdir(tmp_path) == ["out"]


def test_bad_export_arguments():
    with pytest.raises(ValueError, match="export dtype='float16'"):
        save_hf(None, "/nonexistent/x", dtype="float16")
    with pytest.raises(ValueError, match="shard size '2 parsecs'"):
        save_hf(None, "/nonexistent/x", shard_size="2 parsecs")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size(1234) == 1234
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ValueError):
        parse_size("0MB")
