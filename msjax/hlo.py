"""What a compiled program's loop moves between chips, read from its optimized HLO text
(`compiled.as_text()`), the program the TPU compiler will actually run.

    loop = decode_loop(compiled.as_text())
    stats = loop_collectives(loop, param_elements={...})

Per iteration of a `while` loop, every collective in its body and condition is counted, with the
collectives of nested loops (the layer scan) multiplied by their trip counts and a `conditional`
at its costliest branch. A collective split by the compiler into several fusions (start / work /
done) shares one `channel_id` and is counted once. Bytes are per chip, received over the
interconnect by a ring algorithm in a replica group of g chips, from the operand size B:

    all-gather          B * (g - 1)             (the other chips' shards)
    reduce-scatter      B * (g - 1) / g
    all-reduce          2 * B * (g - 1) / g     (reduce-scatter + all-gather)
    all-to-all          B * (g - 1) / g
    collective-permute  B

An all-gather is counted as a PARAMETER gather when the gathered array has as many elements as a
parameter or as one layer's slice of a stacked parameter (`param_elements`); the decode loop's
activations are [rows, ...] arrays of other sizes.
"""

from __future__ import annotations

import dataclasses
import math
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}
_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16})
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_KINDS = {
    "all-gather": "all-gather",
    "all-gather-start": "all-gather",
    "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute",
}
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: result `shape` text, `opcode`, operand names, the text between
    its parentheses (`args`), the attribute text after them, and whether it is the ROOT."""

    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    args: str
    attrs: str
    root: bool = False

    def called(self) -> list[str]:
        """Names of the computations it calls (fusion, while, conditional, call, ...)."""
        names = re.findall(
            r"(?:calls|body|condition|to_apply|_computation)=%([\w.\-]+)", self.attrs
        )
        for group in re.findall(r"branch_computations=\{([^}]*)\}", self.attrs):
            names += re.findall(r"%([\w.\-]+)", group)
        return names


@dataclasses.dataclass(frozen=True)
class Module:
    """computations: name -> instructions; entry: the ENTRY computation's name."""

    computations: dict[str, list[Instruction]]
    entry: str

    def shapes(self, computation: str) -> dict[str, str]:
        return {i.name: i.shape for i in self.computations[computation]}


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start] ("(" or "{")."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c in pairs:
            depth += 1
        elif c in pairs.values():
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced HLO text: {text[start : start + 80]!r}")


def _instruction(line: str) -> Instruction | None:
    m = re.match(r"\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):
        end = _closing(rest, 0)
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _closing(rest, op.end() - 1)
    args = rest[op.end() : close - 1]
    operands = tuple(re.findall(r"%([\w.\-]+)", args))
    return Instruction(
        m.group(2), shape, op.group(1), operands, args, rest[close:], bool(m.group(1))
    )


def parse(text: str) -> Module:
    """Parses `compiled.as_text()` into computations of instructions."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        head = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            computations[current] = []
            if head.group(1):
                entry = current
            continue
        if current is not None and line.startswith(" "):
            instr = _instruction(line)
            if instr is not None:
                computations[current].append(instr)
    if entry is None:
        raise ValueError("HLO text without an ENTRY computation")
    return Module(computations, entry)


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a shape text (a tuple gives several)."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> int:
    return sum(math.prod(dims) * _BYTES.get(dt, 4) for dt, dims in arrays(shape))


def group_size(attrs: str) -> int:
    """Chips per replica group, from `replica_groups=` in any of XLA's three spellings."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    return 2  # source_target_pairs (collective-permute): one peer


@dataclasses.dataclass
class LoopCollectives:
    """Per loop iteration and per chip: `count` and `bytes` (received) by collective kind,
    `param_gathers` and `param_gather_bytes` of the all-gathers of parameters, `unknown_trips`
    nested loops whose trip count could not be read (counted once)."""

    count: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    param_gathers: float = 0
    param_gather_bytes: float = 0.0
    unknown_trips: int = 0

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def add(self, other: LoopCollectives, times: float = 1.0) -> None:
        for k in KINDS:
            self.count[k] += times * other.count[k]
            self.bytes[k] += times * other.bytes[k]
        self.param_gathers += times * other.param_gathers
        self.param_gather_bytes += times * other.param_gather_bytes
        self.unknown_trips += other.unknown_trips


def trip_count(module: Module, loop: Instruction) -> int | None:
    """A while loop's trip count: XLA's known_trip_count, else N from a condition whose ROOT is
    `counter < constant(N)` (a counter from 0 in steps of 1, as lax.scan's); None if neither."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if m:
        return int(m.group(1))
    cond = module.computations[re.search(r"condition=%([\w.\-]+)", loop.attrs).group(1)]
    consts = {i.name: i.args for i in cond if i.opcode == "constant"}
    root = next((i for i in cond if i.root), None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
        return None
    bound = consts.get(root.operands[1], "")
    return int(bound) if re.fullmatch(r"\d+", bound) else None


def loop_collectives(
    module: Module, loop: Instruction, param_elements: frozenset[int] = frozenset()
) -> LoopCollectives:
    """The collectives of ONE iteration of `loop` (a while instruction): its condition and
    body, nested loops times their trip counts (see module doc)."""
    out = LoopCollectives()
    for name in _loop_parts(loop):
        out.add(_collectives(module, name, param_elements, set()))
    return out


def program_collectives(
    module: Module, param_elements: frozenset[int] = frozenset()
) -> LoopCollectives:
    """The collectives of one run of the whole program, with every loop whose trip count is
    unknown (the decode loop stops at EOS) counted once: where a collective appears at all."""
    return _collectives(module, module.entry, param_elements, set())


def _loop_parts(loop: Instruction) -> list[str]:
    return [re.search(rf"{k}=%([\w.\-]+)", loop.attrs).group(1) for k in ("condition", "body")]


def _collectives(module, computation, param_elements, channels) -> LoopCollectives:
    """Collectives of one execution of `computation`, with the fusions and calls it makes
    (sharing `channels`, the channel ids already counted in this execution)."""
    out = LoopCollectives()
    shapes = module.shapes(computation)
    for i in module.computations[computation]:
        kind = _KINDS.get(i.opcode)
        if kind is not None:
            channel = re.search(r"channel_id=(\d+)", i.attrs)
            if channel is not None and channel.group(1) in channels:
                continue
            if channel is not None:
                channels.add(channel.group(1))
            operand = sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
            g = group_size(i.attrs)
            moved = {
                "all-gather": operand * (g - 1),
                "all-reduce": 2 * operand * (g - 1) / g,
                "collective-permute": operand,
            }.get(kind, operand * (g - 1) / g)
            out.count[kind] += 1
            out.bytes[kind] += moved
            if kind == "all-gather" and i.operands:
                elements = sum(math.prod(d) for _, d in arrays(shapes.get(i.operands[0], "")))
                if elements * g in param_elements:
                    out.param_gathers += 1
                    out.param_gather_bytes += moved
        elif i.opcode == "while":
            trips = trip_count(module, i)
            inner = LoopCollectives()
            for name in _loop_parts(i):
                inner.add(_collectives(module, name, param_elements, set()))
            out.add(inner, 1 if trips is None else trips)
            out.unknown_trips += trips is None
        elif i.opcode == "conditional":
            branches = [_collectives(module, b, param_elements, set()) for b in i.called()]
            out.add(max(branches, key=lambda b: b.total_bytes, default=LoopCollectives()))
        elif i.opcode in ("fusion", "call", "async-start"):
            for name in i.called():
                out.add(_collectives(module, name, param_elements, channels))
    return out


def main_loops(module: Module) -> list[Instruction]:
    """The while loops of the ENTRY computation, the largest body (with what it calls) first."""
    loops = [i for i in module.computations[module.entry] if i.opcode == "while"]
    return sorted(loops, key=lambda i: -_size(module, _loop_parts(i)[1], set()))


def _size(module, computation, seen) -> int:
    if computation in seen:
        return 0
    seen.add(computation)
    instrs = module.computations[computation]
    return len(instrs) + sum(_size(module, c, seen) for i in instrs for c in i.called())
