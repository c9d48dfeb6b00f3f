"""Training-only settings (SPRM head gradient scale and dropout, loss knobs) come from the recipe,
are recorded with the run, and a resume with other values is refused."""

import pytest
from flax import nnx

from experiments.configs.tiny import get_config
from msjax import checkpoint as ckpt
from msjax.models import create_model
from msjax.rl import config as rlc
from msjax.rl.trainer import Trainer


def tiny(workdir, **train):
    c = get_config()
    c.workdir = str(workdir)
    c.log.update(progress=False, tensorboard=False)
    c.checkpoint.async_save = False
    c.mesh.update(data=1, fsdp=4, tensor=2)  # the 8 test devices; micro-batches of 4 rows
    c.train.update(**train)
    return c


def test_recipe_head_settings_replace_the_start_checkpoints_and_resume_checks_them(tmp_path):
    start = tmp_path / "start"
    cfg = rlc.model_config(tiny(start)).replace(head_grad_scale=1.0, head_dropout=0.1)
    ckpt.save_model(start, create_model(cfg, seed=0), cfg)
    c = tiny(tmp_path / "run")
    c.init = str(start)
    trainer = Trainer(c)
    try:
        head = nnx.merge(trainer.graphdef, trainer.state.params).head
        assert (head.grad_scale, head.dropout) == (1e-4, 0.5)  # the recipe's, not the start's
        saved = ckpt.read_config(tmp_path / "run")
        assert (saved.head_grad_scale, saved.head_dropout) == (1e-4, 0.5)
        assert trainer.save(force=True)
    finally:
        trainer.close()

    other = tiny(tmp_path / "run", head_grad_scale=1.0)
    other.init = str(start)
    match = r"train\.head_grad_scale was 0\.0001, the config now gives 1\.0"
    with pytest.raises(ValueError, match=match) as e:
        Trainer(other)
    assert "--config.train.head_grad_scale=0.0001" in str(e.value)
    other = tiny(tmp_path / "run")
    other.init = str(start)
    other.loss.spr_threshold = 0.6
    with pytest.raises(ValueError, match=r"loss\.spr_threshold was 0\.5"):
        Trainer(other)
