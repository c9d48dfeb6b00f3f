"""Ahead-of-time planning: compile one RL step's programs for a topology from abstract state and
report per-device memory, whether it fits, FLOPs and the MFU implied by a step time, before any
accelerator is rented. Nothing is allocated: parameters, optimizer state and batches are
jax.ShapeDtypeStruct with shardings on a mesh of the topology's (compile-only) devices.

    report = plan(get_config(), "v5p-64")       # a recipe from experiments/configs
    print(report.format()); report.fits()

The programs are the trainer's own (msjax.rl.trainer.Trainer) at their largest shapes (prompts
padded to data.max_prompt_len, responses to rollout.max_new_tokens):
  train_step    one PPO mini-batch update of ppo_mini_batch x group_size sequences, micro-batched
                inside (msjax.rl.train_step.make_train_step)
  ref_logprobs  the log-prob forward of one mini-batch (micro-batched inside, no gradient): once
                for the old log-probs (loss.old_logprobs="recompute") and once for the reference
                policy's (loss.kl_coef > 0) per mini-batch
  prefill       the sampler's prompt pass for one call of rollout.max_rows_per_call sequences
  decode        the sampler's decode loop for that call (KV cache donated)
The sampler runs on the rollout engine's decode copy of the weights (msjax.generate.weights:
tensor-parallel, replicated over data/fsdp, rollout.decode_dtype), which stays resident beside the
training state; `sampler_layout="train"` compiles it on the training parameters instead.

The decode loop is also read from the compiled HLO (msjax.hlo): per decode step (one token in
every row) and per chip, the bytes its collectives move between chips, those of them that gather
parameters (`decode_gathered_param_bytes_per_token`; 0 with the decode layout), and the HBM bytes
a step must read at least (the weights a chip holds or gathers + the KV cache, read once), with
the tokens/s per chip that this implies at the chip's HBM bandwidth (a roofline, msjax.topology).

Memory per device of a program = arguments + outputs - aliased (donated) + temporaries + code,
from `compiled.memory_analysis()`, plus RESIDENT buffers that the trainer keeps on the devices
while the program runs without passing them to it: the optimizer state and the frozen reference
parameters beside the sampler, the reference parameters beside the train step, the train state
beside the reference forward, and the decode copy of the weights beside every program but the
sampler's, which takes it as an argument. A program fits when that total is at most the chip's HBM
(msjax.topology); a compile that fails for lack of memory does not fit.

FLOPs (msjax.flops): `compiled.cost_analysis()` counts every loop body once, so it is kept only
as `compiler_flops` (per device, for reference). The figures used are matmul FLOPs of the traced
program with every loop multiplied by its trip count, for all devices together: `flops` is what
executes (remat recomputation included); `model_flops` is the algorithm's own work, used for MFU:
3 x the forward pass of the mini-batch (forward + backward), plus one forward for the SPR
statistics pre-pass of loss.spr_stats_scope="minibatch" when the mini-batch is micro-batched
(none with the default "microbatch" scope). Decode is counted at its maximum (every
row runs to max_new_tokens). MFU at a train-step time S: model_flops / (S x devices x peak).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from msjax import checkpoint as ckpt
from msjax import hlo
from msjax import sharding as sh
from msjax.flops import jaxpr_flops, traced_flops
from msjax.generate import decode as decode_mod
from msjax.generate.config import SamplerConfig
from msjax.generate.weights import DecodeWeights
from msjax.models.reflective import abstract_model
from msjax.rl import config as rlc
from msjax.rl import train_step as ts
from msjax.rl.optimizer import make_optimizer
from msjax.topology import GIB, Topology, parse_topology

PROGRAMS = ("train_step", "ref_logprobs", "prefill", "decode")
SAMPLER_LAYOUTS = ("decode", "train")
# Placeholder token ids for the sampler's EOS / step / think tokens: they change no shape, so the
# compiled program's memory and FLOPs are those of the real tokenizer's.
_PLACEHOLDER_IDS = dict(eos_ids=(1,), pad_id=0, step_ids=(2,), think_start_id=3, think_end_id=4)


@dataclasses.dataclass
class DecodeLoop:
    """The decode loop per step (one token in each of `rows` rows) and per chip (see module doc):
    collective counts and bytes received by kind, bytes of parameter gathers, the number of
    parameter gathers anywhere in the program (in or out of the loop), nested loops whose
    trip count was unknown (counted once), the weights and KV cache a chip holds (all cache slots
    are attended each step; `live_kv_bytes`: the mean over a call of the slots in use, prompt +
    max_new_tokens / 2), chips, and the chip's HBM bandwidth (bytes/s, None on CPU).

    HBM bytes per step: the weights a chip holds, the parameters it gathers (written, then read)
    and the KV cache, each read once: a lower bound on the traffic of one step."""

    rows: int
    devices: int
    collective_count: dict
    collective_bytes: dict
    gathered_param_bytes: float
    program_param_gathers: int
    unknown_trips: int
    weight_bytes: int
    kv_bytes: int
    live_kv_bytes: int
    hbm_bandwidth: float | None

    @property
    def hbm_bytes_per_step(self) -> int:
        return int(self.weight_bytes + self.gathered_param_bytes + self.kv_bytes)

    def tokens_per_s_per_chip(self, live: bool = False) -> float | None:
        """Roofline: rows / (HBM bytes per step / bandwidth) / chips (None without bandwidth)."""
        if not self.hbm_bandwidth:
            return None
        read = self.hbm_bytes_per_step - (self.kv_bytes - self.live_kv_bytes if live else 0)
        return self.rows * self.hbm_bandwidth / read / self.devices

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "collective_bytes_total": sum(self.collective_bytes.values()),
            "hbm_bytes_per_step": self.hbm_bytes_per_step,
            "roofline_tokens_per_s_per_chip": self.tokens_per_s_per_chip(),
            "roofline_tokens_per_s_per_chip_live_kv": self.tokens_per_s_per_chip(live=True),
        }


@dataclasses.dataclass
class ProgramReport:
    """One compiled program: bytes are per device, FLOPs for all devices together (except
    compiler_flops: XLA's per-device figure with each loop body counted once)."""

    name: str
    calls: int  # per RL step
    tokens: int  # per call (decode: the most it can generate)
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    resident_bytes: int = 0
    flops: float = 0.0
    model_flops: float = 0.0
    compiler_flops: float | None = None
    error: str | None = None  # the compiler's message when it failed for lack of memory
    loop: DecodeLoop | None = None  # the decode program's loop, read from its HLO

    @property
    def total_bytes(self) -> int:
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
            + self.resident_bytes
        )

    def to_dict(self) -> dict:
        out = {**dataclasses.asdict(self), "total_bytes": self.total_bytes}
        out["loop"] = None if self.loop is None else self.loop.to_dict()
        return out


@dataclasses.dataclass
class Report:
    """The plan of one recipe on one topology (see module doc)."""

    config_name: str
    topology: Topology
    mesh: dict
    num_params: int
    programs: list[ProgramReport]
    step_time: float | None = None

    @property
    def hbm_bytes(self) -> int:
        return self.topology.hbm_bytes()

    def fits(self) -> bool:
        return all(p.error is None and p.total_bytes <= self.hbm_bytes for p in self.programs)

    def problems(self) -> list[str]:
        """One "does not fit" line per program that does not fit."""
        out = []
        where = f"{self.topology.name} ({self.topology.grid})"
        for p in self.programs:
            if p.error is not None:
                out.append(
                    f"{p.name} does not fit on {where}: the compiler ran out of memory: {p.error}"
                )
            elif p.total_bytes > self.hbm_bytes:
                out.append(
                    f"{p.name} does not fit on {where}: it needs {_gib(p.total_bytes)} GiB per "
                    f"device (arguments {_gib(p.argument_bytes)}, outputs {_gib(p.output_bytes)}, "
                    f"donated -{_gib(p.alias_bytes)}, temporaries {_gib(p.temp_bytes)}, code "
                    f"{_gib(p.code_bytes)}, resident {_gib(p.resident_bytes)}) but a device has "
                    f"{_gib(self.hbm_bytes)} GiB."
                )
        return out

    def rl_step_flops(self) -> float:
        """Executed FLOPs of one RL step (every program times its calls)."""
        return sum(p.flops * p.calls for p in self.programs)

    def mfu(self) -> float | None:
        """MFU of the train step at `step_time` seconds per call (None when unknown)."""
        peak = self.topology.peak_flops
        train = [p for p in self.programs if p.name == "train_step" and p.error is None]
        if not (self.step_time and peak and train):
            return None
        return train[0].model_flops / (self.step_time * self.topology.num_devices * peak)

    def to_dict(self) -> dict:
        t = self.topology
        return {
            "config": self.config_name,
            "topology": t.name,
            "grid": t.grid,
            "devices": t.num_devices,
            "hbm_bytes_per_device": self.hbm_bytes,
            "peak_flops_per_device": t.peak_flops,
            "mesh": self.mesh,
            "num_params": self.num_params,
            "programs": [p.to_dict() for p in self.programs],
            "rl_step_flops": self.rl_step_flops(),
            "step_time": self.step_time,
            "mfu": self.mfu(),
            "fits": self.fits(),
            "problems": self.problems(),
            "decode_gathered_param_bytes_per_token": next(
                (p.loop.gathered_param_bytes for p in self.programs if p.loop is not None), None
            ),
        }

    def format(self) -> str:
        """A human-readable table (GiB, or MiB for small programs, per device; FLOPs per call,
        all devices)."""
        t = self.topology
        small = max((p.total_bytes for p in self.programs), default=0) < GIB
        unit, div = ("MiB", 1 << 20) if small else ("GiB", GIB)
        b = lambda n: f"{n / div:.2f}"
        peak = f", {t.peak_flops / 1e12:.0f} TFLOP/s bf16" if t.peak_flops else ""
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"{self.config_name} on {t.name} = {t.grid}: {t.num_devices} devices "
            f"({_gib(self.hbm_bytes)} GiB{peak} each); mesh {mesh}; "
            f"{_count(self.num_params)} parameters",
            "",
            f"{unit + ' per device':<16}{'calls':>6}{'args':>9}{'outputs':>9}{'donated':>9}"
            f"{'temp':>9}{'code':>7}{'resident':>10}{'total':>9}  fits",
        ]
        for p in self.programs:
            if p.error is not None:
                lines.append(f"{p.name:<16}{p.calls:>6}  compile failed: out of memory  no")
                continue
            ok = "yes" if p.total_bytes <= self.hbm_bytes else "NO"
            lines.append(
                f"{p.name:<16}{p.calls:>6}{b(p.argument_bytes):>9}{b(p.output_bytes):>9}"
                f"{'-' + b(p.alias_bytes):>9}{b(p.temp_bytes):>9}{b(p.code_bytes):>7}"
                f"{b(p.resident_bytes):>10}{b(p.total_bytes):>9}  {ok}"
            )
        lines += [
            "",
            f"{'FLOPs per call':<16}{'model':>11}{'executed':>11}{'tokens':>13}"
            f"{'compiler/dev*':>15}",
        ]
        for p in self.programs:
            comp = "-" if p.compiler_flops is None else f"{p.compiler_flops:.3g}"
            lines.append(
                f"{p.name:<16}{p.model_flops:>11.3g}{p.flops:>11.3g}{p.tokens:>13,}{comp:>15}"
            )
        lines += [
            f"RL step (all calls): {self.rl_step_flops():.3g} FLOPs executed.",
            "* XLA's cost analysis counts each loop body once (layers, micro-batches, decode "
            "tokens): reference only.",
        ]
        lines += _format_loop(next((p.loop for p in self.programs if p.loop), None))
        mfu = self.mfu()
        if mfu is not None:
            train = next(p for p in self.programs if p.name == "train_step")
            lines.append(
                f"train_step at {self.step_time:g} s: MFU {100 * mfu:.1f}% "
                f"({train.tokens / self.step_time:,.0f} tokens/s)."
            )
        if self.fits():
            big = max(self.programs, key=lambda p: p.total_bytes)
            lines.append(
                f"fits: the largest program, {big.name}, needs {_gib(big.total_bytes)} of "
                f"{_gib(self.hbm_bytes)} GiB per device "
                f"({100 * big.total_bytes / self.hbm_bytes:.0f}%)."
            )
        else:
            lines += self.problems()
        return "\n".join(lines)


def _format_loop(loop: DecodeLoop | None) -> list[str]:
    if loop is None:
        return []
    size = lambda n: f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"
    moved = ", ".join(
        f"{k} {loop.collective_count[k]:g}x {size(loop.collective_bytes[k])}"
        for k in hlo.KINDS
        if loop.collective_count[k]
    )
    lines = [
        f"decode step ({loop.rows} rows, one token each), per chip: collectives "
        f"{moved or 'none'}; parameters gathered {size(loop.gathered_param_bytes)}.",
        f"  HBM read per step >= {size(loop.hbm_bytes_per_step)}: weights "
        f"{size(loop.weight_bytes)} + gathered {size(loop.gathered_param_bytes)} + KV cache "
        f"{size(loop.kv_bytes)} (live on average {size(loop.live_kv_bytes)}).",
    ]
    if loop.hbm_bandwidth:
        lines.append(
            f"  roofline at {loop.hbm_bandwidth / 1e9:.0f} GB/s: "
            f"{loop.tokens_per_s_per_chip():,.0f} tokens/s per chip "
            f"({loop.tokens_per_s_per_chip(live=True):,.0f} reading only the live KV)."
        )
    if loop.unknown_trips:
        lines.append(f"  ({loop.unknown_trips} nested loop(s) of unknown trip count counted once)")
    return lines


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:g}"


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded jax.ShapeDtypeStruct / jax.Array."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _model_config(c: ml_collections.ConfigDict):
    """The model the trainer would build: config.init's architecture when set, else config.model;
    then config.model_overrides."""
    if not c.init:
        return rlc.model_config(c)
    if ckpt.is_checkpoint_dir(c.init):
        return rlc.model_config(c, ckpt.read_config(c.init))
    from msjax.hf.config import config_from_hf, read_config_json

    return rlc.model_config(c, config_from_hf(read_config_json(c.init)))


def _compile(lower):
    """(compiled, None), or (None, message) when the compiler runs out of device memory."""
    try:
        return lower().compile(), None
    except jax.errors.JaxRuntimeError as e:
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
            raise
        return None, " ".join(message.split())[:400]


def _measure(report: ProgramReport, compiled) -> None:
    ma = compiled.memory_analysis()
    if ma is not None:
        report.argument_bytes = int(ma.argument_size_in_bytes)
        report.output_bytes = int(ma.output_size_in_bytes)
        report.alias_bytes = int(ma.alias_size_in_bytes)
        report.temp_bytes = int(ma.temp_size_in_bytes)
        report.code_bytes = int(ma.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        report.compiler_flops = float(cost["flops"])


def plan(
    config: ml_collections.ConfigDict,
    topology: Topology | str,
    *,
    programs=PROGRAMS,
    step_time: float | None = None,
    config_name: str = "config",
    sampler_layout: str = "decode",
) -> Report:
    """Compiles the requested programs of `config` for `topology` and measures them.

    sampler_layout: "decode" (the rollout engine's copy of the weights, as the trainer runs it)
    or "train" (the sampler on the training parameters and their shardings).
    Raises ValueError (before compiling) for an unknown topology, program or layout, an
    inconsistent config, or a mesh that does not divide the model.
    """
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"Unknown program(s) {unknown}; choose from {PROGRAMS}.")
    if step_time is not None and step_time <= 0:
        raise ValueError(f"step_time={step_time} must be > 0 seconds.")
    if sampler_layout not in SAMPLER_LAYOUTS:
        raise ValueError(f"sampler_layout={sampler_layout!r}; choose from {SAMPLER_LAYOUTS}.")
    c = config.copy_and_resolve_references()
    c.workdir = c.workdir or "aot"  # validate() wants one; nothing is written
    mesh = sh.make_mesh(dict(c.mesh), topo.devices())
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rlc.validate(c, batch_shards=shards)
    cfg = _model_config(c)
    loss_cfg = rlc.loss_config(c)
    tx = make_optimizer(rlc.optimizer_config(c))
    graphdef, abstract = abstract_model(cfg, mesh)
    param_sh = nnx.to_pure_dict(sh.state_shardings(abstract, mesh))
    params = _abstract(nnx.to_pure_dict(abstract), param_sh)
    abstract_state = jax.eval_shape(lambda p: ts.init_train_state(p, tx, c.seed), params)
    state_sh = ts.train_state_shardings(abstract_state, param_sh, mesh)
    state = _abstract(abstract_state, state_sh)

    r, t = c.rollout, c.train
    n, seq = r.group_size, c.data.max_prompt_len + r.max_new_tokens
    mb_rows = t.ppo_mini_batch * n
    kl = bool(loss_cfg.kl_coef)
    # Log-prob forwards per mini-batch: the old log-probs (recomputed) and the reference's.
    logp_uses = int(kl) + int(loss_cfg.old_logprobs == "recompute")
    state_bytes, param_bytes = device_bytes(state), device_bytes(params)
    ref_bytes = param_bytes if kl else 0
    env = _Env(mesh, graphdef, cfg, loss_cfg, params, param_sh, seq)
    decode_bytes = 0
    sampler_params, sampler_resident = params, state_bytes - param_bytes + ref_bytes
    if sampler_layout == "decode":
        sampler_params = DecodeWeights(abstract, mesh, c.rollout.decode_dtype).abstract
        decode_bytes = device_bytes(sampler_params)
        sampler_resident = state_bytes + ref_bytes

    reports = []
    if "train_step" in programs:
        calls = r.prompts_per_step // t.ppo_mini_batch * t.ppo_epochs
        resident = ref_bytes + decode_bytes
        rep = ProgramReport("train_step", calls, mb_rows * seq, resident_bytes=resident)
        env.train_step(rep, tx, state, state_sh, mb_rows)
        reports.append(rep)
    if "ref_logprobs" in programs and logp_uses:
        calls = r.prompts_per_step // t.ppo_mini_batch * logp_uses
        resident = state_bytes + decode_bytes
        rep = ProgramReport("ref_logprobs", calls, mb_rows * seq, resident_bytes=resident)
        env.ref_logprobs(rep, mb_rows)
        reports.append(rep)
    if {"prefill", "decode"} & set(programs):
        per_call = r.max_rows_per_call // n or r.prompts_per_step
        calls = -(-r.prompts_per_step // per_call)
        reports += env.sampler(
            c, per_call, calls, sampler_resident, shards, programs, sampler_params,
            _param_elements(abstract, mesh), topo.hbm_bandwidth,
        )  # fmt: skip
    return Report(
        config_name=config_name,
        topology=topo,
        mesh=dict(mesh.shape),
        num_params=cfg.num_params(),
        programs=reports,
        step_time=step_time,
    )


@dataclasses.dataclass
class _Env:
    """What every program's lowering needs."""

    mesh: object
    graphdef: object
    cfg: object
    loss_cfg: ts.LossConfig
    params: dict
    param_sh: dict
    seq: int

    def _rows(self, rows: int, ndim: int, dtype) -> jax.ShapeDtypeStruct:
        shape = (rows,) if ndim == 1 else (rows, self.seq)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh.batch_sharding(self.mesh, ndim))

    def train_step(self, rep, tx, state, state_sh, rows: int) -> None:
        dtypes = dict(tokens=jnp.int32, positions=jnp.int32, old_logp=jnp.float32)
        dtypes.update(ref_logp=jnp.float32, advantages=jnp.float32, labels=jnp.float32)
        batch = {
            k: self._rows(rows, 1 if k in ("advantages", "labels") else 2, dtypes.get(k, bool))
            for k in ts.BATCH_KEYS
        }
        step = ts.make_train_step(
            self.graphdef, tx, self.loss_cfg, mesh=self.mesh, state_shardings=state_sh
        )
        traced = step.trace(state, batch)
        compiled, rep.error = _compile(traced.lower)
        if compiled is not None:
            _measure(rep, compiled)
        rep.flops = jaxpr_flops(traced.jaxpr)
        forward = functools.partial(ts._forward, self.graphdef, cfg=self.loss_cfg, dropout_rng=None)
        rep.model_flops = 3 * traced_flops(
            lambda p, b: forward(p, b, with_logp=True), self.params, batch
        )
        lc = self.loss_cfg
        if lc.num_microbatches > 1 and lc.spr_stats_scope == "minibatch" and lc.spr_coef:
            rep.model_flops += traced_flops(
                lambda p, b: forward(p, b, with_logp=False), self.params, batch
            )

    def ref_logprobs(self, rep, rows: int) -> None:
        fn = ts.make_logprob_fn(
            self.graphdef, self.loss_cfg, mesh=self.mesh, param_shardings=self.param_sh
        )
        args = (
            self.params,
            self._rows(rows, 2, jnp.int32),
            self._rows(rows, 2, jnp.int32),
            self._rows(rows, 2, bool),
        )
        traced = fn.trace(*args)
        compiled, rep.error = _compile(traced.lower)
        if compiled is not None:
            _measure(rep, compiled)
        rep.flops = rep.model_flops = jaxpr_flops(traced.jaxpr)

    def sampler(
        self, c, prompts, calls, resident, shards, wanted, params, param_elements, bandwidth
    ):
        """Reports for the prefill and the decode of one sampler call of `prompts` prompts on
        `params` (the decode copy or the training parameters); the decode report's `loop` is
        read from its HLO."""
        r, n = c.rollout, c.rollout.group_size
        config = SamplerConfig(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            **_PLACEHOLDER_IDS,
        )
        program = decode_mod.DecodeProgram(self.graphdef, self.cfg, config, self.mesh, n)
        b = -(-prompts // shards) * shards  # as Sampler.__call__ pads the batch
        rows = -(-prompts * n // shards) * shards
        length = c.data.max_prompt_len
        args = _prefill_args(self.mesh, params, b, rows, length)
        pre = ProgramReport("prefill", calls, b * length, resident_bytes=resident)
        dec = ProgramReport("decode", calls, rows * r.max_new_tokens, resident_bytes=resident)
        with jax.set_mesh(self.mesh):
            traced = decode_mod.prefill.trace(program, *args)
        compiled, pre.error = _compile(traced.lower)
        if compiled is not None:
            _measure(pre, compiled)
        pre.flops = pre.model_flops = jaxpr_flops(traced.jaxpr)
        out = [pre] if "prefill" in wanted else []
        if "decode" not in wanted:
            return out
        if compiled is None:
            dec.error = "not compiled: its inputs come from the prefill, which did not fit"
            return [*out, dec]
        cache, state = _abstract(traced.out_info, compiled.output_shardings)
        with jax.set_mesh(self.mesh):
            traced = decode_mod.decode.trace(program, params, cache, state)
        compiled, dec.error = _compile(traced.lower)
        if compiled is not None:
            _measure(dec, compiled)
            kv = device_bytes(cache)
            live = (length + r.max_new_tokens / 2) / (length + r.max_new_tokens)
            dec.loop = _decode_loop(
                compiled.as_text(), param_elements, rows, self.mesh.size, device_bytes(params),
                kv, int(kv * live), bandwidth,
            )  # fmt: skip
        # The loop runs at most max_new_tokens - 1 times (prefill samples the first token).
        trips = max(r.max_new_tokens - 1, 1)
        dec.flops = dec.model_flops = jaxpr_flops(traced.jaxpr, while_trips=trips)
        return [*out, dec]


def _param_elements(abstract, mesh) -> frozenset[int]:
    """What one chip holds after gathering a parameter: the element counts of every parameter
    with an `embed` axis (every weight matrix: those FSDP splits), whole or split over `tensor`,
    and of one layer's slice of the stacked ones."""
    out = set()
    tensor_axes = {name for name, target in sh.RULES if target == "tensor"}
    for _, v in nnx.to_flat_state(abstract):
        axes = v.get_metadata().get("axes") or ()
        if "embed" not in axes:
            continue
        sizes = {math.prod(v.shape)}
        if axes[0] == "layers":
            sizes.add(math.prod(v.shape[1:]))
        split = mesh.shape["tensor"] if tensor_axes & set(axes) else 1
        out |= sizes | {n // split for n in sizes}
    return frozenset(out)


def _decode_loop(text, param_elements, rows, devices, weight_bytes, kv, live_kv, bandwidth):
    """DecodeLoop of a compiled decode program (its largest top-level while loop)."""
    module = hlo.parse(text)
    loops = hlo.main_loops(module)
    if not loops:
        raise ValueError("the compiled decode program has no while loop")
    stats = hlo.loop_collectives(module, loops[0], param_elements)
    return DecodeLoop(
        rows=rows,
        devices=devices,
        collective_count=stats.count,
        collective_bytes=stats.bytes,
        gathered_param_bytes=stats.param_gather_bytes,
        program_param_gathers=int(hlo.program_collectives(module, param_elements).param_gathers),
        unknown_trips=stats.unknown_trips,
        weight_bytes=weight_bytes,
        kv_bytes=kv,
        live_kv_bytes=live_kv,
        hbm_bandwidth=bandwidth,
    )


def _prefill_args(mesh, params, b: int, rows: int, length: int) -> tuple:
    """Abstract arguments of `DecodeProgram.prefill` after the program: params, prompt
    int32[b, L], prompt_len int32[b], source int32[rows], real bool[rows], row_ids int32[rows],
    key (a typed PRNG key, replicated)."""
    S = jax.ShapeDtypeStruct
    bs = lambda ndim: sh.batch_sharding(mesh, ndim)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return (
        params,
        S((b, length), jnp.int32, sharding=bs(2)),
        S((b,), jnp.int32, sharding=bs(1)),
        S((rows,), jnp.int32, sharding=bs(1)),
        S((rows,), bool, sharding=bs(1)),
        S((rows,), jnp.int32, sharding=bs(1)),
        S(key.shape, key.dtype, sharding=sh.replicated(mesh)),
    )
