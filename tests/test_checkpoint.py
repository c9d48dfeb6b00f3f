"""msjax checkpoint directory: save/load round trips (other mesh, other dtype, other items),
steps, load_any for both kinds of folder, and the clear errors."""

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent / "hf"))
from tiny_hf import build_hf, write_tokenizer  # noqa: E402

from msjax import checkpoint as ck  # noqa: E402
from msjax.hf import load_hf  # noqa: E402
from msjax.sharding import make_mesh  # noqa: E402


def _params(model):
    return {"/".join(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same(a, b):
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    build_hf(path, hidden=32, heads=4, kv_heads=2, intermediate=64, layers=3, seed=7)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    model, cfg = load_hf(hf)
    path = tmp_path_factory.mktemp("ck") / "run"
    ck.save_model(path, model, cfg, step=0, tokenizer_dir=hf)
    return path, model, cfg


def test_layout_and_round_trip(saved, hf):
    path, model, cfg = saved
    meta = json.loads((path / "msjax.json").read_text())
    assert meta["format"] == "msjax" and meta["format_version"] == 1
    assert meta["model_config"] == cfg.to_dict()
    assert (path / "tokenizer" / "tokenizer.json").read_bytes() == (
        hf / "tokenizer.json"
    ).read_bytes()
    assert (path / "checkpoints" / "0" / "params").is_dir()
    assert ck.is_checkpoint_dir(path) and not ck.is_checkpoint_dir(hf)
    assert ck.latest_step(path) == 0
    assert ck.tokenizer_dir(path) == path / "tokenizer" and ck.tokenizer_dir(hf) == hf
    loaded, cfg2 = ck.load_model(path)
    assert cfg2 == cfg
    _assert_same(loaded, model)


def test_load_onto_a_different_mesh_and_dtype(saved):
    path, model, _ = saved
    mesh = make_mesh((2, 2, 2))
    loaded, cfg = ck.load_model(path, mesh)
    q = nnx.state(loaded)["backbone"]["layers"]["attn"]["q_kernel"].get_value()
    assert q.sharding.mesh == mesh and q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
    _assert_same(loaded, model)
    half, cfg = ck.load_model(path, make_mesh((1, 8, 1)), dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    for k, v in _params(half).items():
        assert v.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(v, _params(model)[k].astype(jax.numpy.bfloat16))


def test_latest_and_given_steps_and_other_items(saved, tmp_path):
    path = Path(shutil.copytree(saved[0], tmp_path / "run"))
    model, cfg = saved[1], saved[2]
    state = nnx.state(model, nnx.Param)
    bumped = jax.tree.map(lambda x: x + 1, state)
    ck.save_model(path, bumped, cfg, step=5)
    # a trainer adds its own items to the same step directories
    with ck.checkpoint_manager(path) as mngr:
        mngr.save(
            9,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.to_pure_dict()),
                opt_state=ocp.args.StandardSave({"mu": np.ones(3), "count": np.int32(4)}),
            ),
        )
        mngr.wait_until_finished()
    assert ck.latest_step(path) == 9
    _assert_same(ck.load_model(path)[0], model)
    five = _params(ck.load_model(path, step=5)[0])
    for k, v in _params(model).items():
        np.testing.assert_array_equal(five[k], v + 1)
    _assert_same(ck.load_model(path, step=0)[0], model)


def test_load_any_reads_both_kinds(saved, hf):
    from_hf, cfg_hf = ck.load_any(hf)
    from_ck, cfg_ck = ck.load_any(saved[0])
    assert cfg_hf == cfg_ck
    _assert_same(from_hf, from_ck)


# ---------------------------------------------------------------- one test per bad input


def test_error_neither_hf_nor_msjax(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither an msjax checkpoint directory .* nor a Hugging"):
        ck.load_any(tmp_path)


def test_error_config_does_not_match_saved_params(saved, tmp_path):
    path = Path(shutil.copytree(saved[0], tmp_path / "run"))
    meta = json.loads((path / "msjax.json").read_text())
    meta["model_config"]["intermediate_size"] = 32
    (path / "msjax.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match the saved parameters.*down_kernel"):
        ck.load_model(path)


def test_error_saving_another_model_into_a_checkpoint(saved):
    path, model, cfg = saved
    with pytest.raises(ValueError, match="different model.*hidden_size"):
        ck.save_model(path, model, cfg.replace(hidden_size=64, head_dim=8), step=1)


def test_error_step_already_saved(saved):
    path, model, cfg = saved
    with pytest.raises(FileExistsError, match="step 0 is already saved"):
        ck.save_model(path, model, cfg, step=0)


def test_error_missing_step_and_bad_meta(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved step 3"):
        ck.load_model(saved[0], step=3)
    path = Path(shutil.copytree(saved[0], tmp_path / "run"))
    (path / "msjax.json").write_text(json.dumps({"format": "msjax", "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        ck.load_model(path)
