"""Whole-step costs of a compiled program, read from its HLO text: FLOPs, HBM bytes, Pallas kernels' estimates and
collective bytes by kind, with every loop body counted as often as its loop runs (XLA's `cost_analysis()` counts a
loop body once, so on a scanned model it reports one layer pair, not the step)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

# Bytes per element of the HLO element types.
ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                 "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
                    "collective-permute")
# Instructions that run other computations as control flow (their bodies are scheduled ops, not fused ones).
_CONTROL_CALLS = ("call", "call-start", "async-start", "conditional")


# Parsing ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result shape as printed, layout included
  opcode: str
  operands: list[str]  # names of the operand instructions
  literal: str  # the text inside the parentheses (a constant's value)
  attrs: str  # everything after the operands

  def attr(self, key: str) -> str | None:
    """The value of `key=...`: a %name, a {...} or "..." block, or a bare token."""
    m = re.search(rf"(?:^|[\s,]){re.escape(key)}=", self.attrs)
    if not m:
      return None
    rest = self.attrs[m.end():]
    if rest[:1] in "{\"[":
      return _balanced(rest, 0)
    return re.match(r"[^,\s]*", rest).group(0)

  def callee(self, key: str) -> str | None:
    v = self.attr(key)
    return v.lstrip("%") if v else None


@dataclasses.dataclass
class Computation:
  name: str
  text: str  # the computation as printed, header to closing brace
  instructions: dict[str, Instruction]
  root: Instruction | None


@dataclasses.dataclass
class Module:
  computations: dict[str, Computation]  # in printed order: callees before callers
  entry: str


def _balanced(s: str, i: int) -> str:
  """The bracketed block starting at s[i] (one of ( [ { or a "string"), brackets included."""
  if s[i] == '"':
    j = i + 1
    while s[j] != '"':
      j += 2 if s[j] == "\\" else 1
    return s[i:j + 1]
  pairs = {"(": ")", "[": "]", "{": "}"}
  depth, j, in_str = 0, i, False
  while j < len(s):
    c = s[j]
    if in_str:
      if c == "\\":
        j += 1
      elif c == '"':
        in_str = False
    elif c == '"':
      in_str = True
    elif c in pairs:
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth == 0:
        return s[i:j + 1]
    j += 1
  raise ValueError(f"HLO text: unbalanced brackets in {s[i:i + 200]!r}")


_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s+\(")
_LHS = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*")


def _parse_instruction(line: str) -> Instruction | None:
  m = _LHS.match(line)
  if not m:
    return None
  i = m.end()
  if line[i] == "(":
    shape = _balanced(line, i)
  else:
    shape = re.match(r"\S+", line[i:]).group(0)
  i += len(shape)
  m2 = re.compile(r"\s*([\w\-]+)\(").match(line, i)
  if not m2:
    return None
  opcode = m2.group(1)
  args = _balanced(line, m2.end() - 1)
  attrs = line[m2.end() - 1 + len(args):].lstrip(", ")
  inner = args[1:-1]
  return Instruction(name=m.group(1), shape=shape, opcode=opcode, operands=re.findall(r"%([^\s,()]+)", inner),
                     literal=inner, attrs=attrs)


_END = re.compile(r'^\}(, execution_thread="[^"]*")?\s*$')


def parse_module(text: str) -> Module:
  """The computations of an HLO module's text (`compiled.as_text()`)."""
  comps: dict[str, Computation] = {}
  entry = None
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    m = _HEADER.match(line)
    if not (m and line.rstrip().endswith("{")):
      i += 1
      continue
    name = m.group(2)
    start = i
    # An instruction is one line, except where an attribute string holds newlines (Pallas kernels' metadata):
    # its following lines start with neither an indent nor the computation's closing brace.
    stmts: list[str] = []
    i += 1
    while i < len(lines) and not _END.match(lines[i]):
      if lines[i].startswith("  ") or not stmts:
        stmts.append(lines[i])
      else:
        stmts[-1] += "\n" + lines[i]
      i += 1
    instrs: dict[str, Instruction] = {}
    root = None
    for stmt in stmts:
      ins = _parse_instruction(stmt)
      if ins is not None:
        instrs[ins.name] = ins
        if stmt.lstrip().startswith("ROOT "):
          root = ins
    comps[name] = Computation(name, "\n".join(lines[start:i + 1]), instrs, root)
    if m.group(1):
      entry = name
    i += 1
  if entry is None:
    raise ValueError("HLO text: no ENTRY computation (pass the compiled module's as_text())")
  return Module(comps, entry)


# Shapes -------------------------------------------------------------------------------------------------------
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")


def _arrays(shape: str):
  """(element type, dims, layout) of each array in a shape (a tuple gives several)."""
  for m in _ARRAY.finditer(shape):
    dims = [int(d) for d in m.group(2).split(",") if d]
    yield m.group(1), dims, m.group(3) or ""


def element_bytes(dtype: str) -> float:
  if dtype in ELEMENT_BYTES:
    return ELEMENT_BYTES[dtype]
  if dtype.startswith("f8") or dtype.startswith("f4"):
    return 1 if dtype.startswith("f8") else 0.5
  raise ValueError(f"HLO text: unknown element type {dtype!r}")


def shape_bytes(shape: str) -> float:
  """Bytes of a shape at its logical size (a tuple: the sum of its arrays)."""
  return float(sum(element_bytes(t) * math.prod(d) for t, d, _ in _arrays(shape)))


def shape_dims(shape: str) -> list[int]:
  arrays = list(_arrays(shape))
  if len(arrays) != 1:
    raise ValueError(f"HLO text: expected one array, got {shape!r}")
  return arrays[0][1]


# Loops and the call graph ------------------------------------------------------------------------------------
def _int_value(comp: Computation, name: str, module: Module, depth: int = 0) -> int | None:
  """The integer a scalar instruction holds when it is a constant (through copies and converts)."""
  ins = comp.instructions.get(name)
  if ins is None or depth > 8:
    return None
  if ins.opcode == "constant":
    try:
      return int(float(ins.literal))
    except ValueError:
      return None
  if ins.opcode in ("copy", "bitcast", "convert", "reshape") and ins.operands:
    return _int_value(comp, ins.operands[0], module, depth + 1)
  return None


def _tuple_index(comp: Computation, name: str, depth: int = 0) -> int | None:
  """k when the instruction is element k of the computation's (tuple) parameter."""
  ins = comp.instructions.get(name)
  if ins is None or depth > 8:
    return None
  if ins.opcode == "get-tuple-element":
    src = comp.instructions.get(ins.operands[0]) if ins.operands else None
    if src is not None and src.opcode == "parameter":
      return int(ins.attr("index"))
  if ins.opcode in ("copy", "bitcast", "convert") and ins.operands:
    return _tuple_index(comp, ins.operands[0], depth + 1)
  return None


def _compare(module: Module, cond: Computation):
  """(direction, [(comp, operand name)] x 2) of the loop condition's comparison, looking through a fusion."""
  root = cond.root
  if root is None:
    return None
  if root.opcode == "compare":
    return root.attr("direction"), [(cond, n) for n in root.operands]
  if root.opcode == "fusion":
    fused = module.computations.get(root.callee("calls") or "")
    froot = fused.root if fused else None
    if froot is None or froot.opcode != "compare":
      return None
    sides = []
    for n in froot.operands:
      p = fused.instructions[n]
      if p.opcode == "parameter":
        sides.append((cond, root.operands[int(p.literal)]))
      elif p.opcode == "constant":
        sides.append((fused, n))
      else:
        return None
    return froot.attr("direction"), sides
  return None


def trip_count(module: Module, caller: Computation, loop: Instruction) -> int | None:
  """How many times a `while` runs: XLA's `known_trip_count` where the backend records it (CPU, GPU), else read
  from the loop as scans compile: `i < N` on one tuple element, its start in the loop's initial tuple (0 when not a
  constant), its step in the body's `i + c`. None when the loop has another form."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if m:
    return int(m.group(1))
  cond = module.computations.get(loop.callee("condition") or "")
  body = module.computations.get(loop.callee("body") or "")
  if cond is None or body is None:
    return None
  cmp = _compare(module, cond)
  if cmp is None or len(cmp[1]) != 2:
    return None
  direction, ((ca, a), (cb, b)) = cmp
  k, bound = _tuple_index(ca, a), _int_value(cb, b, module)
  if k is None or bound is None:  # the counter may be on the right: N > i
    k, bound = _tuple_index(cb, b), _int_value(ca, a, module)
    direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
  if k is None or bound is None:
    return None
  init = 0
  init_tuple = caller.instructions.get(loop.operands[0]) if loop.operands else None
  if init_tuple is not None and init_tuple.opcode == "tuple" and k < len(init_tuple.operands):
    v = _int_value(caller, init_tuple.operands[k], module)
    init = 0 if v is None else v
  step = 1
  if body.root is not None and body.root.opcode == "tuple" and k < len(body.root.operands):
    upd = body.instructions.get(body.root.operands[k])
    if upd is not None and upd.opcode in ("add", "subtract") and len(upd.operands) == 2:
      for x, y in ((0, 1), (1, 0)):
        if _tuple_index(body, upd.operands[x]) == k:
          c = _int_value(body, upd.operands[y], module)
          if c:
            step = c if upd.opcode == "add" else -c
  if direction in ("LT", "LE") and step > 0:
    n = math.ceil((bound - init + (1 if direction == "LE" else 0)) / step)
  elif direction in ("GT", "GE") and step < 0:
    n = math.ceil((init - bound + (1 if direction == "GE" else 0)) / -step)
  elif direction == "NE" and step and (bound - init) % step == 0:
    n = (bound - init) // step
  else:
    return None
  return max(n, 0)


@dataclasses.dataclass
class Loop:
  name: str  # the while instruction
  computation: str  # where it is
  trips: int | None  # None: unknown, counted once
  runs: float  # times the loop itself starts per program run


def _calls(ins: Instruction) -> list[tuple[str, str]]:
  """(callee, how) for each computation an instruction runs: how is 'body', 'condition', 'control' or 'fused'."""
  out = []
  if ins.opcode == "while":
    out += [(ins.callee("body"), "body"), (ins.callee("condition"), "condition")]
  elif ins.opcode == "fusion":
    out.append((ins.callee("calls"), "fused"))
  elif ins.opcode in _CONTROL_CALLS:
    for key in ("to_apply", "calls", "true_computation", "false_computation"):
      if ins.callee(key):
        out.append((ins.callee(key), "control"))
    branches = ins.attr("branch_computations")
    if branches:
      out += [(n, "control") for n in re.findall(r"%([^\s,{}]+)", branches)]
  return [(c, how) for c, how in out if c]


def run_counts(module: Module, fused: bool = False) -> tuple[dict[str, float], list[Loop]]:
  """Times each control-flow computation runs per program run (a while body: its trips times its loop's runs;
  a condition one more), and every loop found. Fused computations (which run as part of their fusion
  instruction) are included only when `fused`: TPU fuses some collectives (an all-reduce sliced into a
  reduce-scatter)."""
  counts: dict[str, float] = {module.entry: 1.0}
  loops: list[Loop] = []
  # Printed order puts callees before callers, so the reverse visits every caller before its callees.
  for comp in reversed(list(module.computations.values())):
    n = counts.get(comp.name)
    if not n:
      continue
    for ins in comp.instructions.values():
      calls = _calls(ins)
      if not calls:
        continue
      trips = trip_count(module, comp, ins) if ins.opcode == "while" else None
      if ins.opcode == "while":
        loops.append(Loop(ins.name, comp.name, trips, n))
      for callee, how in calls:
        if how == "fused" and not fused:
          continue
        times = 1 if trips is None else {"body": trips, "condition": trips + 1}.get(how, 1)
        counts[callee] = counts.get(callee, 0.0) + n * times
  return counts, loops


# XLA's cost model per computation ----------------------------------------------------------------------------
def _reachable(module: Module, name: str) -> list[str]:
  seen: set[str] = set()
  stack = [name]
  while stack:
    c = stack.pop()
    if c in seen or c not in module.computations:
      continue
    seen.add(c)
    for ins in module.computations[c].instructions.values():
      for key in ("calls", "to_apply", "body", "condition", "true_computation", "false_computation",
                  "called_computations", "branch_computations"):
        v = ins.attr(key)
        if v:
          stack += re.findall(r"%?([^\s,{}%]+)", v)
  return [c for c in module.computations if c in seen]


def _xla_cost(module: Module, name: str) -> dict[str, float]:
  """XLA's HloCostAnalysis of the program whose entry is computation `name` (each loop body inside once).

  It runs on the CPU client on the text of the compiled module: a compile-only TPU client cannot run it, and the
  analysis is the same code on every backend except custom calls (counted apart) and tile padding (not counted).
  """
  # Only here does reading HLO need jax (its CPU client); the rest of this module parses text.
  import jax
  from jax._src.lib import _jax
  from jaxlib import _hlo

  parts = []
  for c in _reachable(module, name):
    text = module.computations[c].text
    # Stack frames index a table this partial module does not carry.
    text = re.sub(r"\s*stack_frame_id=\d+", "", re.sub(r"^ENTRY\s+", "", text))
    parts.append(("ENTRY " if c == name else "") + text)
  hlo = _hlo.hlo_module_from_text("HloModule part\n\n" + "\n\n".join(parts) + "\n")
  cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, hlo)
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def whole_xla_cost(module: Module) -> dict[str, float]:
  """XLA's FLOPs and bytes accessed of one program run with every loop body counted `trips` times.

  XLA's analysis of a computation counts each loop inside it once, so a computation's whole cost is its
  analysis plus, per loop directly under it, (trips - 1) more bodies and trips more conditions, recursively.
  """
  counts, loops = run_counts(module)
  by_comp: dict[str, list[Instruction]] = {}
  for comp in module.computations.values():
    for ins in comp.instructions.values():
      if ins.opcode == "while":
        by_comp.setdefault(comp.name, []).append(ins)

  once = functools.lru_cache(maxsize=None)(lambda c: _xla_cost(module, c))

  @functools.lru_cache(maxsize=None)
  def whole(c: str) -> tuple[float, float]:
    base = once(c)
    flops, nbytes = base["flops"], base["bytes"]
    for sub in _loops_under(module, c, by_comp):
      comp_name, loop = sub
      trips = trip_count(module, module.computations[comp_name], loop)
      if trips is None:
        continue
      for callee, times in ((loop.callee("body"), trips), (loop.callee("condition"), trips + 1)):
        f, b = whole(callee)
        o = once(callee)
        flops += times * f - o["flops"]
        nbytes += times * b - o["bytes"]
    return flops, nbytes

  f, b = whole(module.entry)
  return {"flops": f, "bytes": b}


def _loops_under(module: Module, name: str, by_comp) -> list[tuple[str, Instruction]]:
  """The while loops a computation runs directly or through calls and conditionals (not inside other loops)."""
  out, stack, seen = [], [name], set()
  while stack:
    c = stack.pop()
    if c in seen or c not in module.computations:
      continue
    seen.add(c)
    out += [(c, w) for w in by_comp.get(c, [])]
    for ins in module.computations[c].instructions.values():
      if ins.opcode != "while":
        stack += [callee for callee, how in _calls(ins) if how == "control"]
  return out


# Collectives and kernels --------------------------------------------------------------------------------------
def group_size(ins: Instruction, num_devices: int) -> int:
  """Devices in each replica group of a collective, from any of XLA's printed forms."""
  g = ins.attr("replica_groups")
  if g is None or g in ("{}", "{{}}"):
    return num_devices
  if g.startswith("{"):
    first = re.search(r"\{([0-9,\s]+)\}", g)
    return len(first.group(1).split(",")) if first else num_devices
  if g.startswith("["):  # iota form: [groups, size]<=[devices]
    dims = [int(d) for d in g[1:g.index("]")].split(",")]
    return dims[-1]
  if g.startswith("mesh"):  # mesh['a'=2,'b'=4](, device_ids=...) {'b'}: the named axes' sizes multiplied
    rest = ins.attrs[ins.attrs.index("replica_groups=") + len("replica_groups="):]
    m = re.match(r"mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
    if m:
      sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
      axes = re.findall(r"'([^']+)'", m.group(2))
      if axes and all(a in sizes for a in axes):
        return math.prod(sizes[a] for a in axes)
  raise ValueError(f"HLO text: cannot read the replica groups of {ins.name}: {g!r}")


@dataclasses.dataclass
class CollectiveBytes:
  count: float = 0.0  # ops run per step
  bytes: float = 0.0  # per device: the gathered result (all-gather) or the operand (the others)
  ici_bytes: float = 0.0  # per device, what crosses the links on a ring: (n-1)/n of it, twice for all-reduce


def collective_bytes(ins: Instruction, comp: Computation, num_devices: int) -> tuple[str, float, float] | None:
  """(kind, bytes, ici bytes) of one collective instruction, per device; None for other instructions."""
  kind = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") else ins.opcode
  if kind not in COLLECTIVE_KINDS:
    return None

  def operand(i: int) -> float:
    src = comp.instructions.get(ins.operands[i])
    if src is None:
      raise ValueError(f"HLO text: operand {ins.operands[i]} of {ins.name} is not defined in {comp.name}")
    return shape_bytes(src.shape)

  if kind == "collective-permute":
    b = operand(0)
    return kind, b, b
  n = group_size(ins, num_devices)
  share = (n - 1) / n
  if kind == "ragged-all-to-all":
    # A device sends the rows it holds: the smaller of the input rows and the output buffer.
    b = min(operand(0), operand(1))
    return kind, b, b * share
  b = sum(operand(i) for i in range(len(ins.operands)))
  if kind == "all-gather":
    return kind, b * n, b * (n - 1)
  root = comp.root
  if kind == "all-reduce" and root is not None and root.opcode == "dynamic-slice" and root.operands[:1] == [ins.name]:
    # TPU's all-reduce-scatter fusion: an all-reduce whose computation keeps only this device's slice.
    return "reduce-scatter", b, b * share
  if kind == "all-reduce":
    return kind, b, 2 * b * share
  return kind, b, b * share


def kernel_name(ins: Instruction) -> str:
  """A Pallas kernel's name: the instruction's name without its numeric suffix (gmm.13 -> gmm)."""
  return re.sub(r"(\.\d+)+$", "", ins.name)


def kernel_estimate(ins: Instruction) -> dict[str, float] | None:
  """The cost estimate a Pallas TPU kernel carries in its backend config; None when it has none."""
  cfg = ins.attr("backend_config")
  m = re.search(r'"cost_estimate":(\{[^}]*\})', cfg or "")
  if not m:
    return None
  est = json.loads(m.group(1))
  return {"flops": float(est.get("flops", 0)), "bytes": float(est.get("bytes_accessed", 0))}


@dataclasses.dataclass
class HloCosts:
  """One program run of the compiled module, per device."""
  xla_flops: float  # XLA's cost model over the XLA ops, every loop body times its trips
  xla_bytes: float  # its bytes accessed (HBM traffic of the ops at their logical sizes)
  kernel_flops: dict[str, float]  # per Pallas kernel with a cost estimate: its estimate, times its runs
  kernel_bytes: dict[str, float]
  kernels_without_estimate: dict[str, float]  # kernel name -> runs per step (their work is not counted above)
  collectives: dict[str, CollectiveBytes]
  loops: list[Loop]

  @property
  def flops(self) -> float:
    return self.xla_flops + sum(self.kernel_flops.values())

  @property
  def hbm_bytes(self) -> float:
    return self.xla_bytes + sum(self.kernel_bytes.values())

  @property
  def ici_bytes(self) -> float:
    return sum(c.ici_bytes for c in self.collectives.values())

  @property
  def unknown_loops(self) -> list[str]:
    return [lp.name for lp in self.loops if lp.trips is None]


def analyze(text: str, num_devices: int) -> HloCosts:
  """Whole-program costs of a compiled module's HLO text (`compiled.as_text()`), per device.

  `num_devices` sizes collectives whose replica groups are empty (all devices).
  """
  module = parse_module(text)
  _, loops = run_counts(module)
  counts, _ = run_counts(module, fused=True)
  xla = whole_xla_cost(module)
  kflops: dict[str, float] = {}
  kbytes: dict[str, float] = {}
  missing: dict[str, float] = {}
  colls = {k: CollectiveBytes() for k in COLLECTIVE_KINDS}
  for name, n in counts.items():
    comp = module.computations.get(name)
    if comp is None:
      continue
    for ins in comp.instructions.values():
      if ins.opcode == "custom-call" and ins.attr("custom_call_target") == '"tpu_custom_call"':
        est, kname = kernel_estimate(ins), kernel_name(ins)
        if est is None:
          missing[kname] = missing.get(kname, 0.0) + n
        else:
          kflops[kname] = kflops.get(kname, 0.0) + n * est["flops"]
          kbytes[kname] = kbytes.get(kname, 0.0) + n * est["bytes"]
        continue
      got = collective_bytes(ins, comp, num_devices)
      if got is not None:
        kind, b, ici = got
        c = colls[kind]
        c.count += n
        c.bytes += n * b
        c.ici_bytes += n * ici
  return HloCosts(xla_flops=xla["flops"], xla_bytes=xla["bytes"], kernel_flops=kflops, kernel_bytes=kbytes,
                  kernels_without_estimate=missing, collectives=colls, loops=loops)
