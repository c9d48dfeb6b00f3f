"""msjax.hlo on a hand-written HLO module whose per-iteration traffic is counted by hand: a
collective split over two fusions (one channel), a nested loop of 5 trips, a conditional, the
three spellings of replica groups, and a loop condition that itself communicates."""

import pytest

from msjax import hlo

MODULE = """HloModule decode_like

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%gather_start (p0: bf16[16,64]) -> bf16[64,64] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  ROOT %ag = bf16[64,64]{1,0} all-gather(%p0), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
}

%gather_done (p0: bf16[16,64]) -> bf16[64,64] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  ROOT %ag2 = bf16[64,64]{1,0} all-gather(%p0), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
}

%inner_body (t: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %t = (s32[], f32[8,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,32]{1,0} get-tuple-element(%t), index=1
  %r = f32[8,32]{1,0} all-reduce(%x), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[8,32]{1,0}) tuple(%j, %r)
}

%inner_cond (t: (s32[], f32[8,32])) -> pred[] {
  %t = (s32[], f32[8,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%branch_a (x: f32[8,32]) -> f32[8,32] {
  %x = f32[8,32]{1,0} parameter(0)
  ROOT %cp = f32[8,32]{1,0} collective-permute(%x), channel_id=3, source_target_pairs={{0,1},{1,0}}
}

%branch_b (x: f32[8,32]) -> f32[8,32] {
  %x = f32[8,32]{1,0} parameter(0)
  ROOT %y = f32[8,32]{1,0} negate(%x)
}

%body (s: (s32[], bf16[16,64], f32[8,32], s32[])) -> (s32[], bf16[16,64], f32[8,32], s32[]) {
  %s = (s32[], bf16[16,64]{1,0}, f32[8,32]{1,0}, s32[]) parameter(0)
  %w = bf16[16,64]{1,0} get-tuple-element(%s), index=1
  %x = f32[8,32]{1,0} get-tuple-element(%s), index=2
  %b = s32[] get-tuple-element(%s), index=3
  %f1 = bf16[64,64]{1,0} fusion(%w), kind=kLoop, calls=%gather_start
  %f2 = bf16[64,64]{1,0} fusion(%w), kind=kLoop, calls=%gather_done
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,32]{1,0}) tuple(%zero, %x)
  %loop = (s32[], f32[8,32]{1,0}) while(%init), condition=%inner_cond, body=%inner_body
  %y = f32[8,32]{1,0} get-tuple-element(%loop), index=1
  %c = f32[8,32]{1,0} conditional(%b, %y, %y), branch_computations={%branch_a, %branch_b}
  %rs = f32[2,32]{1,0} reduce-scatter(%c), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %k = s32[] get-tuple-element(%s), index=0
  ROOT %o = (s32[], bf16[16,64]{1,0}, f32[8,32]{1,0}, s32[]) tuple(%k, %w, %c, %b)
}

%cond (s: (s32[], bf16[16,64], f32[8,32], s32[])) -> pred[] {
  %s = (s32[], bf16[16,64]{1,0}, f32[8,32]{1,0}, s32[]) parameter(0)
  %k = s32[] get-tuple-element(%s), index=0
  %u = u32[] convert(%k)
  %any = u32[] all-reduce(%u), channel_id=5, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, to_apply=%add
  %z = u32[] constant(0)
  ROOT %go = pred[] compare(%any, %z), direction=NE
}

ENTRY %main (w: bf16[16,64], x: f32[8,32]) -> f32[8,32] {
  %w = bf16[16,64]{1,0} parameter(0)
  %x = f32[8,32]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[16,64]{1,0}, f32[8,32]{1,0}, s32[]) tuple(%zero, %w, %x, %zero)
  %decode = (s32[], bf16[16,64]{1,0}, f32[8,32]{1,0}, s32[]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,32]{1,0} get-tuple-element(%decode), index=2
}
"""  # noqa: E501 (HLO lines as XLA prints them)


@pytest.fixture(scope="module")
def module():
    return hlo.parse(MODULE)


def test_parse_finds_computations_shapes_and_the_main_loop(module):
    assert module.entry == "main"
    assert module.shapes("body")["f1"].startswith("bf16[64,64]")
    assert hlo.shape_bytes(module.shapes("body")["s"]) == 4 + 16 * 64 * 2 + 8 * 32 * 4 + 4
    (loop,) = hlo.main_loops(module)
    assert loop.name == "decode" and loop.called() == ["cond", "body"]
    inner = next(i for i in module.computations["body"] if i.opcode == "while")
    assert hlo.trip_count(module, inner) == 5
    assert hlo.trip_count(module, loop) is None  # its condition is no `i < N`


def test_group_sizes_in_the_three_spellings():
    assert hlo.group_size("replica_groups=[2,4]<=[8], dimensions={0}") == 4
    assert hlo.group_size("replica_groups={{0,1,2},{3,4,5}}, to_apply=%add") == 3
    assert hlo.group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}") == 4
    assert hlo.group_size("replica_groups=mesh['a'=2,'b'=4,'c'=2] {'a','c'}") == 4


def test_one_iteration_counted_by_hand(module):
    (loop,) = hlo.main_loops(module)
    stats = hlo.loop_collectives(module, loop, param_elements=frozenset({64 * 64}))
    # all-gather of bf16[16,64] (2048 B) over 4 chips, split in two fusions of one channel:
    # once, 3 x 2048 B received; it gathers 4096 elements, a parameter's size.
    # all-reduce of f32[8,32] (1024 B) over 2 chips, 5 trips: 5 x 2 x 1024 x 1/2.
    # cond: all-reduce of u32 over 2 chips: 2 x 4 x 1/2. conditional: the permute branch.
    # reduce-scatter of 1024 B over 4 chips: 1024 x 3/4.
    assert stats.count == {
        "all-gather": 1, "all-reduce": 6, "reduce-scatter": 1, "all-to-all": 0,
        "collective-permute": 1,
    }  # fmt: skip
    assert stats.bytes == {
        "all-gather": 6144, "all-reduce": 5 * 1024 + 4, "reduce-scatter": 768, "all-to-all": 0,
        "collective-permute": 1024,
    }  # fmt: skip
    assert (stats.param_gathers, stats.param_gather_bytes) == (1, 6144)
    assert stats.unknown_trips == 0
    other = hlo.loop_collectives(module, loop, param_elements=frozenset({16 * 64}))
    assert (other.param_gathers, other.param_gather_bytes) == (0, 0)
    # The whole program: the decode loop (unknown trips) counted once, so the same figures.
    whole = hlo.program_collectives(module, frozenset({64 * 64}))
    assert (whole.bytes, whole.param_gathers, whole.unknown_trips) == (stats.bytes, 1, 1)
