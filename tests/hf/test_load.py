"""load_hf: sharded inputs, placement on a 2x2x2 mesh, head files, one test per bad input."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from tiny_hf import build_hf, msjax_forward

from msjax.hf import load_hf
from msjax.sharding import make_mesh

TOKENS = np.random.RandomState(0).randint(0, 64, (4, 9)).astype(np.int32)
POS = np.broadcast_to(np.arange(9, dtype=np.int32), (4, 9))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """An untied GQA-2 model whose dims divide a 2x2x2 mesh, with score_module.pt."""
    path = tmp_path_factory.mktemp("hf")
    model, head = build_hf(path, hidden=32, heads=4, kv_heads=2, intermediate=64, layers=3)
    with torch.no_grad():
        out = model(torch.tensor(TOKENS, dtype=torch.long), output_hidden_states=True)
    return path, out.logits.numpy(), out.hidden_states[-2].numpy(), head


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_matches_transformers_and_reads_the_head(hf):
    path, logits, penult, head = hf
    model, cfg = load_hf(path)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.param_dtype) == (3, 2, "float32")
    out_logits, out_penult = msjax_forward(model, TOKENS)
    np.testing.assert_allclose(out_logits, logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out_penult, penult, atol=1e-4, rtol=0)
    with torch.no_grad():
        ref = head(torch.tensor(penult)).squeeze(-1).numpy()
    got = np.asarray(model.step_logits(penult))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_sharded_safetensors_with_index(hf, tmp_path):
    path, logits, _, _ = hf
    # re-save the same weights split over several files with an index, as save_pretrained does
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for k in range(3):
        part = {n: tensors[n] for n in names[k::3]}
        fname = f"model-{k + 1:05d}-of-00003.safetensors"
        save_file(part, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(path / "config.json", tmp_path)
    shutil.copy(path / "score_module.pt", tmp_path)
    model, _ = load_hf(tmp_path)
    np.testing.assert_allclose(msjax_forward(model, TOKENS)[0], logits, atol=1e-4)


def test_mesh_2x2x2_same_logits_and_expected_shardings(hf):
    path, logits, _, _ = hf
    mesh = make_mesh((2, 2, 2))
    model, _ = load_hf(path, mesh=mesh)
    state = nnx.state(model)
    q = state["backbone"]["layers"]["attn"]["q_kernel"].get_value()
    assert q.shape == (2, 32, 4, 8) and q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
    o = state["backbone"]["last_layer"]["attn"]["o_kernel"].get_value()
    assert o.sharding.spec == P("tensor", None, "fsdp")
    assert state["backbone"]["embed"].get_value().sharding.spec == P("tensor", "fsdp")
    assert state["head"]["w1"].get_value().sharding.spec == P("fsdp", "tensor")
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.mesh == mesh and len(leaf.addressable_shards) == 8

    graphdef, st = nnx.split(model)

    @jax.jit
    def fwd(st, tokens, pos):
        return nnx.merge(graphdef, st)(tokens, pos).logits

    with jax.set_mesh(mesh):
        out = fwd(st, TOKENS, POS)
    single, _ = load_hf(path)
    np.testing.assert_allclose(np.asarray(out), msjax_forward(single, TOKENS)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), logits, atol=1e-4)


def test_bf16_load_and_auto_dtype(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    model, cfg = load_hf(path, dtype="bfloat16")
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    assert model.backbone.embed.get_value().dtype == jax.numpy.bfloat16
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, "dtype": "bfloat16"}))
    assert load_hf(path, dtype="auto")[1].param_dtype == "bfloat16"


def test_no_head_file_initialises_head_and_says_so(hf, tmp_path, caplog):
    path = _copy(hf[0], tmp_path / "m")
    (path / "score_module.pt").unlink()
    with caplog.at_level(logging.INFO):
        model, _ = load_hf(path)
    assert "freshly initialised" in caplog.text
    w1 = np.asarray(model.head.w1.get_value())
    assert w1.shape == (32, 64) and np.abs(w1).max() <= 1 / np.sqrt(32) and w1.std() > 0


def test_head_from_safetensors(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    head = hf[3]
    (path / "score_module.pt").unlink()
    save_file(
        {k: v.detach().numpy() for k, v in head.state_dict().items()},
        str(path / "score_module.safetensors"),
    )
    model, _ = load_hf(path)
    np.testing.assert_array_equal(
        np.asarray(model.head.w1.get_value()), head[0].weight.detach().numpy().T
    )
    np.testing.assert_array_equal(
        np.asarray(model.head.b2.get_value()), head[3].bias.detach().numpy()
    )


def test_tied_checkpoint_carrying_an_equal_lm_head_is_accepted(tmp_path):
    build_hf(tmp_path, hidden=32, heads=4, kv_heads=2, intermediate=64, layers=3, tied=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, cfg = load_hf(tmp_path)
    assert cfg.tie_word_embeddings and not hasattr(model.backbone, "lm_head")


# ---------------------------------------------------------------- one test per bad input


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_error_missing_tensor(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_hf(path)


def test_error_unexpected_tensor(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    _edit_tensors(path, lambda t: t.update({"model.layers.3.mlp.up_proj.weight": np.zeros((2, 2))}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) model\.layers\.3\.mlp\.up_proj"):
        load_hf(path)


def test_error_misshaped_tensor(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    _edit_tensors(path, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight .*shape \(31,\), expected \(32,\)"):
        load_hf(path)


def test_error_tied_config_with_a_different_lm_head(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")  # untied weights: lm_head differs from the embeddings
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="tie_word_embeddings=true but lm_head.weight"):
        load_hf(path)


def test_error_missing_config_json(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_hf(path)


def test_error_no_safetensors(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        load_hf(path)


def test_error_truncated_weights_file_is_named(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for size in (50, len(data) - 100):  # cut inside the header, then inside the tensor data
        weights.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"weights file .*m/model\.safetensors .*truncated"):
            load_hf(path)


def test_error_index_names_a_missing_file(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf(path)


def test_error_bad_score_module_keys(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    state = {f"module.{k}": v for k, v in hf[3].state_dict().items()}
    torch.save(state, path / "score_module.pt")
    with pytest.raises(ValueError, match=r"missing \['0.bias', '0.weight'.*unexpected \['module"):
        load_hf(path)


def test_error_misshaped_score_module(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    state = dict(hf[3].state_dict())
    state["0.weight"] = state["0.weight"][:, :16]
    torch.save(state, path / "score_module.pt")
    with pytest.raises(ValueError, match=r"0\.weight has shape \(64, 16\), expected \(64, 32\)"):
        load_hf(path)


def test_error_two_head_files(hf, tmp_path):
    path = _copy(hf[0], tmp_path / "m")
    save_file({"0.bias": np.zeros(64, np.float32)}, str(path / "score_module.safetensors"))
    with pytest.raises(ValueError, match="both score_module.safetensors and score_module.pt"):
        load_hf(path)


def test_error_mesh_does_not_divide(hf):
    with pytest.raises(ValueError, match="does not divide"):
        load_hf(hf[0], mesh=make_mesh((1, 1, 8)))
