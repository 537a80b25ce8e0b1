"""``python -m dar_jax.aot``: compile train.py's step or the sampling pipeline for a TPU slice
on any host (MaxText's train_compile.py), and report whether it fits and what it costs.

    python -m dar_jax.aot --config configs/ar_gpt_xl.py --topology v5p-32 \\
        [--config.key=value ...] [--program train|sample] [--json report.json] [--save FILE]
    python -m dar_jax.aot --program sample --gpt-config GPT-XL \\
        --tokenizer-config configs/tokenizer_v1.py --batch 256 --topology v5e-8

Nothing is materialised and no weight file is read: the programs are built from abstract
shapes (``jax.eval_shape``) on the devices of the named topology
(``jax.experimental.topologies``) and compiled by the real TPU compiler (libtpu, the ``tpu``
extra: ``pip install -e '.[tpu]'``). The train program is the one ``train.py`` runs (the
trainer's own ``lower_train_step``: mesh and shardings from the config, state donated, the
trainer's XLA options); the
AR task's frozen tokenizer comes from ``--tokenizer-config`` (default: the run config's
tokenizer checkpoint's config.json if it exists, else ``configs/tokenizer_v1.py`` of the working directory) and the
tokenizer task's LPIPS / DINOv2 get abstract weights.

The report (a table, and JSON with ``--json``) holds the compiler's memory and cost analyses,
the attention kernel of every attention site read from the optimized HLO, the collective
bytes, the collective-matmul loops (``windowed_einsum_loops``), the instructions that move the
most HBM bytes (``hbm_top``), and a roofline estimate of the step time (``est_*``:
max(FLOPs / peak, HBM bytes / bandwidth) + collective bytes / ICI bandwidth, with the
constants of ``dar_jax.hardware``).
These are compiler analyses plus a roofline, not measurements. A program that does not fit is
a result (``fits: false`` with the compiler's message, exit 0); an unknown topology or a
missing libtpu is an error naming the fix (exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np

from dar_jax.errors import DarError
from dar_jax.config import ConfigError
from dar_jax.hardware import Topology, TopologyError, parse_topology

# the AR task's tokenizer when neither --tokenizer-config nor the run config names one (relative
# to the working directory, like --config: the commands run from a checkout)
DEFAULT_TOKENIZER_CONFIG = os.path.join("configs", "tokenizer_v1.py")
GIB = 2 ** 30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class AOTError(DarError, ValueError):
    """A compile request that cannot be served (topology, libtpu, configs)."""


# ----------------------------------------------------------------------------------------------
# devices of a TPU slice, on any host
# ----------------------------------------------------------------------------------------------
def tpu_devices(topology: Topology) -> list:
    """The devices of ``topology`` from libtpu (no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise AOTError("libtpu is not installed; the TPU compiler comes with the tpu extra: "
                       "pip install -e '.[tpu]'")
    # compile-only use: several processes may load libtpu at once (else its lockfile refuses)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    kwargs = {}
    if topology.num_chips < 4:   # smaller than a host: say so, or the default host bounds refuse it
        kwargs["chips_per_host_bounds"] = list(topology.shape) + [1] * (3 - len(topology.shape))
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name,
                                            **kwargs)
    except Exception as e:  # libtpu raises JaxRuntimeError for names it does not know
        raise AOTError(f"libtpu cannot build topology {topology.jax_name} ({topology.name}): {e}") from None
    return list(desc.devices)


_HBM_AVAILABLE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_HBM_REQUIRED = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _gib_from(pattern, message: str) -> float | None:
    m = pattern.search(message)
    return float(m.group(1)) * _UNITS[m.group(2)] / GIB if m else None


def compiler_hbm_gib(device) -> float | None:
    """HBM per device as the TPU compiler states it: compile a program that needs more than any
    chip has and read the limit from its out-of-memory message (None if it does not say)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    sh = SingleDeviceSharding(device)
    try:   # a 1 TiB output: more than any chip has
        jax.jit(lambda x: jnp.broadcast_to(x, (2 ** 20, 2 ** 18)), out_shardings=sh).lower(
            jax.ShapeDtypeStruct((2 ** 18,), jnp.float32, sharding=sh)).compile()
    except Exception as e:
        return _gib_from(_HBM_AVAILABLE, str(e))
    return None


# ----------------------------------------------------------------------------------------------
# reading the optimized HLO
# ----------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_SITE = re.compile(r"attention\[([^\]]+)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_LAYOUT_OPS = ("bitcast", "copy", "copy-done", "copy-start", "get-tuple-element", "transpose")


def _arrays(text: str) -> list[float]:
    """Bytes of each array in an HLO shape string (tuples flattened in order)."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out.append(n * _DTYPE_BYTES[dtype])
    return out


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"source_target_pairs=", line)
    return 2 if m else num_devices


_INSTR = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")


def _instructions(hlo: str):
    """(name, result shape text, opcode, operands+attributes text, line) of every instruction."""
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m:
            yield m.group(1), m.group(2), m.group(3), m.group(4), line


def _collective(op: str, shape: str, line: str, num_devices: int) -> tuple[str, float] | None:
    """(kind, bytes this device receives) of a collective instruction (ring algorithms):
    all-gather out * (n-1)/n, reduce-scatter out * (n-1), all-reduce 2 * size * (n-1)/n,
    all-to-all size * (n-1)/n, collective-permute size. Async pairs count at their start."""
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind not in COLLECTIVES or op.endswith("-done"):
        return None
    n = max(_group_size(line, num_devices), 1)
    arrays = _arrays(shape)
    if op.endswith("-start") and kind in ("all-gather", "collective-permute"):
        # (operands, results[, contexts]): the results are the second group
        k = len(arrays) // 2 if kind == "all-gather" else 1
        arrays = arrays[k:2 * k] if kind == "all-gather" else arrays[1:2]
    size = sum(arrays)
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
              "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]
    return kind, size * factor


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
    """Bytes each device receives per step, by kind, counting every instruction once (see
    :func:`hlo_costs` for the count through loops)."""
    out = {k: 0.0 for k in COLLECTIVES}
    for _, shape, op, rest, line in _instructions(hlo):
        c = _collective(op, shape, line, num_devices)
        if c:
            out[c[0]] += c[1]
    return out


# --- costs through loops -------------------------------------------------------------------------
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
# opcodes that move no data of their own
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "iota", "copy-done",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "send-done", "recv-done", "opt-barrier"}


def _parse_module(hlo: str):
    """{computation: (is_entry, [(name, shape, op, rest, line)])} of an HLO module's text."""
    comps, current = {}, None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            comps[current] = (bool(m.group(1)), [])
            continue
        if line.rstrip() == "}":   # (kernel metadata inside instructions may span lines)
            current = None
            continue
        if current is not None:
            im = _INSTR.match(line)
            if im:
                comps[current][1].append(im.groups() + (line,))
    return comps


def _trip_count(line: str, instrs: dict, comps: dict) -> int | None:
    """Iterations of a while loop: XLA's known_trip_count, or ``i < N`` in its condition with
    the start value of ``i`` in the loop's initial tuple."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    init = re.search(r"while\(%?([\w.\-]+)\)", line)
    if not cond or cond.group(1) not in comps or not init:
        return None
    body = {i[0]: i for i in comps[cond.group(1)][1]}
    root = next((i for i in comps[cond.group(1)][1] if i[4].lstrip().startswith("ROOT")), None)
    if root is None or root[2] != "compare":
        return None
    ops = re.findall(r"%([\w.\-]+)", root[3].split(")")[0])
    direction = re.search(r"direction=(\w+)", root[4])
    if len(ops) != 2 or not direction:
        return None
    gte, bound = body.get(ops[0]), body.get(ops[1])
    if gte is None or bound is None or gte[2] != "get-tuple-element" or bound[2] != "constant":
        return None
    index = int(re.search(r"index=(\d+)", gte[4]).group(1))
    limit = int(re.search(r"constant\((-?\d+)\)", bound[4]).group(1))
    tup = instrs.get(init.group(1))
    if tup is None or tup[2] != "tuple":
        return None
    elems = re.findall(r"%([\w.\-]+)", tup[3])
    start = instrs.get(elems[index]) if index < len(elems) else None
    while start is not None and start[2] in ("copy", "bitcast", "convert"):   # to the constant
        src = re.findall(r"%([\w.\-]+)", start[3])
        start = instrs.get(src[0]) if src else None
    if start is None or start[2] != "constant":
        return None
    first = int(re.search(r"constant\((-?\d+)\)", start[4]).group(1))
    step = _loop_step(line, index, comps)
    span = {"LT": limit - first, "LE": limit - first + 1}.get(direction.group(1))
    if span is None or step is None or step <= 0:
        return None
    return max(-(-span // step), 0)


def _loop_step(line: str, index: int, comps: dict) -> int | None:
    """The increment of tuple element ``index`` in a while body: root tuple element
    ``add(get-tuple-element(param, index), constant(step))``."""
    m = re.search(r"body=%?([\w.\-]+)", line)
    if not m or m.group(1) not in comps:
        return None
    instrs = comps[m.group(1)][1]
    table = {i[0]: i for i in instrs}
    root = next((i for i in instrs if i[4].lstrip().startswith("ROOT")), None)
    if root is None or root[2] != "tuple":
        return None
    elems = re.findall(r"%([\w.\-]+)", root[3])
    node = table.get(elems[index]) if index < len(elems) else None
    while node is not None and node[2] in ("copy", "bitcast", "convert"):
        src = re.findall(r"%([\w.\-]+)", node[3])
        node = table.get(src[0]) if src else None
    if node is None or node[2] != "add":
        return None
    for o in re.findall(r"%([\w.\-]+)", node[3].split(")")[0]):
        c = table.get(o)
        if c is not None and c[2] == "constant":
            return int(re.search(r"constant\((-?\d+)\)", c[4]).group(1))
    return None


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _dot_flops(shape: str, rest: str, line: str, table: dict) -> float:
    out = math.prod(_dims(shape))
    lhs = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if not lhs or lhs[0] not in table or not m:
        return 0.0
    dims = _dims(table[lhs[0]])
    k = math.prod(dims[int(i)] for i in m.group(1).split(",") if i)
    return 2.0 * out * k


def _valid_positions(out: int, size: int, inp: int, lo: int, stride: int, lhs_dil: int,
                     rhs_dil: int) -> int:
    """(output, kernel) index pairs of one spatial dimension that land on real input."""
    o = np.arange(out)[:, None] * stride + np.arange(size)[None, :] * rhs_dil - lo
    ok = (o >= 0) & (o <= (inp - 1) * lhs_dil) & (o % lhs_dil == 0)
    return int(ok.sum())


def _conv_flops(shape: str, rest: str, line: str, table: dict) -> float:
    """FLOPs of a convolution as XLA counts them (TPU HLO writes dots as convolutions): 2 x
    input features per group x output features x batch per group x the window positions that
    land on real (unpadded) input, per spatial dimension."""
    ops = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    if len(ops) < 2 or ops[0] not in table or ops[1] not in table or not labels:
        return 0.0
    lhs, rhs, out = _dims(table[ops[0]]), _dims(table[ops[1]]), _dims(shape)
    ll, rl, ol = labels.groups()
    fgc = int((re.search(r"feature_group_count=(\d+)", line) or [0, 1])[1])
    bgc = int((re.search(r"batch_group_count=(\d+)", line) or [0, 1])[1])
    window = re.search(r"window=\{([^}]*)\}", line)
    fields = {}
    for item in (window.group(1).split() if window else []):
        key, _, val = item.partition("=")
        fields[key] = val.split("x")
    spatial = sorted(c for c in ll if c.isdigit())
    positions = 1
    for n, d in enumerate(spatial):
        size = rhs[rl.index(d)]
        pad = fields.get("pad", ["0_0"] * len(spatial))[n].split("_")
        positions *= _valid_positions(out[ol.index(d)], size, lhs[ll.index(d)], int(pad[0]),
                                      int(fields.get("stride", ["1"] * len(spatial))[n]),
                                      int(fields.get("lhs_dilate", ["1"] * len(spatial))[n]),
                                      int(fields.get("rhs_dilate", ["1"] * len(spatial))[n]))
    fma = (lhs[ll.index("f")] // fgc) * out[ol.index("f")] * (lhs[ll.index("b")] // bgc) * positions
    return 2.0 * fma


def _kernel_flops(name: str, line: str) -> float | None:
    """FLOPs of a Mosaic attention kernel from its operand shapes (dense: masked blocks that
    the kernel skips are counted). None for kernels this estimate does not know."""
    m = re.search(r"operand_layout_constraints=\{(.*?\})\}", line)
    shapes = [_dims(t) for t in re.findall(r"(?:bf16|f32|f16)\[[\d,]*\]", m.group(1))] if m else []
    big = [d for d in shapes if len(d) >= 3]
    if len(big) < 2:
        return None
    q, k = big[0], big[1]
    if name.startswith("dar_decode_tpu"):   # q (B, H, D), cache (B, S, H, D)
        return 4.0 * math.prod(k)
    *batch, lq, d = q
    lk = k[-2]
    base = 2.0 * math.prod(batch) * lq * lk * d      # one of its matmuls
    for key, matmuls in (("fwd", 2), ("dq", 3), ("dkv", 4)):
        if key in name:
            return matmuls * base
    return None


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split("), ")[0])


def _hbm_bytes(op: str, shape: str, rest: str, line: str, table: dict, comps: dict) -> float:
    """HBM bytes one unfused instruction moves: its operands and results, except that slices
    read only the slice and in-place updates write only the update (as XLA counts them)."""
    ops = _operands(rest)
    size = lambda name: sum(_arrays(table[name])) if name in table else 0.0
    if op == "dynamic-slice":
        return 2.0 * sum(_arrays(shape))
    if op == "dynamic-update-slice":
        return 2.0 * size(ops[1]) if len(ops) > 1 else 0.0
    if op != "fusion":
        return sum(_arrays(shape)) + sum(size(o) for o in ops)
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = comps.get(called.group(1), (False, []))[1] if called else []
    params, uses, root = {}, {}, None
    for iname, ishape, iop, irest, iline in body:
        if iop == "parameter":
            params[int(re.search(r"parameter\((\d+)\)", iline).group(1))] = iname
        for k, o in enumerate(_operands(irest)):
            uses.setdefault(o, []).append((iop, k, ishape, iname))
        if iline.lstrip().startswith("ROOT"):
            root = (iname, iop, irest)
    fused = {i[0]: i for i in body}
    in_place = set()   # buffers updated in place by a root dynamic-update-slice
    written = sum(_arrays(shape))
    roots = [root] if root and root[1] != "tuple" else [
        (o, fused[o][2], fused[o][3]) for o in (_operands(root[2]) if root else []) if o in fused]
    for rname, rop, rrest in roots:
        if rop == "dynamic-update-slice":
            r_ops = _operands(rrest)
            in_place.add(r_ops[0])
            upd = fused.get(r_ops[1])
            full = sum(_arrays(fused[rname][1]))
            written += (sum(_arrays(upd[1])) if upd else 0.0) - full
    read = 0.0
    for k, name in enumerate(ops):
        pname = params.get(k)
        users = uses.get(pname, []) if pname else []
        if pname in in_place:
            continue
        if users and all(u[0] == "dynamic-slice" and u[1] == 0 for u in users):
            read += sum(sum(_arrays(u[2])) for u in users)
        else:
            read += size(name)
    return read + max(written, 0.0)


def hlo_costs(hlo: str, num_devices: int, top: int = 0) -> dict:
    """Per-device costs of a compiled program counted through its while loops (XLA's
    cost_analysis counts a loop body once; the SPMD partitioner turns FSDP matmuls into
    ring loops): FLOPs of dots and convolutions, estimated FLOPs of the Mosaic attention
    kernels, HBM bytes (operands + results of every unfused instruction), collective bytes by
    kind, the loops whose trip count could not be read (counted once), and the ``top``
    instructions that move the most HBM bytes (``top_hbm``: (bytes, computation, name, op,
    shape), most first)."""
    comps = _parse_module(hlo)
    entry = next(n for n, (is_entry, _) in comps.items() if is_entry)
    # call graph: (caller, callee, times per call, fused), times from while trip counts
    edges: dict[str, list] = {name: [] for name in comps}
    unknown = []
    for name, (_, instrs) in comps.items():
        table = {i[0]: i for i in instrs}
        for iname, shape, op, rest, line in instrs:
            for key, targets in _CALLED.findall(line):
                if key == "to_apply" and op != "call":
                    continue   # reductions' scalar computations
                times = 1
                if op == "while":
                    trips = _trip_count(line, table, comps)
                    if trips is None and key == "body":
                        unknown.append(iname)
                    times = trips if trips is not None else 1
                for t in re.findall(r"%?([\w.\-]+)", targets):
                    if t in comps:
                        edges[name].append((t, times, op == "fusion"))
    # multipliers in topological order of the call graph (Kahn), from the entry
    indeg = {name: 0 for name in comps}
    reach, stack = {entry}, [entry]
    while stack:
        for t, _, _ in edges[stack.pop()]:
            indeg[t] += 1
            if t not in reach:
                reach.add(t)
                stack.append(t)
    mult = {name: 0.0 for name in comps}
    mult[entry] = 1.0
    fused, ready = set(), [entry]
    while ready:
        name = ready.pop()
        for t, times, is_fusion in edges[name]:
            mult[t] += mult[name] * times
            if is_fusion or name in fused:
                fused.add(t)
            indeg[t] -= 1
            if indeg[t] == 0:
                ready.append(t)
    flops = kernel = hbm = 0.0
    coll = {k: 0.0 for k in COLLECTIVES}
    unknown_kernels = set()
    movers = []   # (bytes per step, computation, instruction, op, shape)
    for name, (_, instrs) in comps.items():
        m = mult.get(name, 0.0)
        if not m:
            continue
        table = {i[0]: i[1] for i in instrs}
        for iname, shape, op, rest, line in instrs:
            if op == "dot":
                flops += m * _dot_flops(shape, rest, line, table)
            elif op == "convolution":
                flops += m * _conv_flops(shape, rest, line, table)
            elif op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
                kf = _kernel_flops(iname, line)
                if kf is None:
                    unknown_kernels.add(re.sub(r"\.\d+$", "", iname))
                else:
                    kernel += m * kf
            if name in fused:
                continue
            c = _collective(op, shape, line, num_devices)
            if c:
                coll[c[0]] += m * c[1]
            if op not in _FREE and not op.endswith("-done"):
                moved = m * _hbm_bytes(op, shape, rest, line, table, comps)
                hbm += moved
                movers.append((moved, name, iname, op, shape))
    movers.sort(key=lambda x: -x[0])
    return {"flops": flops, "kernel_flops": kernel, "hbm_bytes": hbm, "collectives": coll,
            "top_hbm": movers[:top],
            "unknown_trip_counts": unknown, "unknown_kernels": sorted(unknown_kernels)}


def windowed_einsum_loops(hlo: str) -> int:
    """How many collective matmuls (XLA's windowed-einsum while loops) a compiled program runs."""
    return len(re.findall(r"\bwhile\(.*body=%?[\w.\-]*windowed_dot_general_body", hlo))


def attention_kernels(hlo: str) -> dict[str, str]:
    """{site: kernel} for every ``attention[site]`` scope in the program: the Mosaic kernels
    (``tpu_custom_call``) run inside it, or "xla" where none does.

    The optimized HLO keeps the scopes in each instruction's ``op_name``; a Mosaic call carries
    none itself, so its site is that of its nearest scoped operands (the padding and transposes
    around it), looking back through bitcasts and copies."""
    scope: dict[str, str] = {}
    producers: dict[str, list[str]] = {}   # layout-only ops -> their operands
    calls = []
    sites: dict[str, set] = {}
    for name, shape, op, rest, line in _instructions(hlo):
        if op in _LAYOUT_OPS:
            producers[name] = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        m = _OP_NAME.search(line)
        found = _SITE.findall(m.group(1)) if m else []
        if found:
            sites.setdefault(found[0], set())
            if op != "constant":   # constants are shared between sites (deduplicated masks)
                scope[name] = found[0]
        if op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
            operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
            calls.append((name, found[0] if found else None, operands))
    for name, site, operands in calls:
        frontier, depth = operands, 0
        while site is None and frontier and depth < 4:
            # the nearest scoped operands vote, looking through bitcasts and copies
            votes = [scope[o] for o in frontier if o in scope]
            if votes:
                site = max(set(votes), key=votes.count)
            frontier = [p for o in frontier if o not in scope for p in producers.get(o, ())]
            depth += 1
        if site is not None:
            sites.setdefault(site, set()).add(re.sub(r"\.\d+$", "", name))
    return {s: ("+".join(sorted(k)) if k else "xla") for s, k in sorted(sites.items())}


# ----------------------------------------------------------------------------------------------
# programs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
    """A lowered program and what the report needs beside the compiler's analyses."""
    name: str
    lowered: Any
    global_batch: int
    model_flops: float                       # analytic, per step, all devices
    fsdp_min_bytes: float | None = None      # per device: params gathered twice, grads scattered
    remat: str | None = None                 # the model's remat policy (train programs)
    compiler_options: dict | None = None     # the XLA options it is compiled with (as train.py)
    notes: list = dataclasses.field(default_factory=list)


def _abstract_tokenizer(path: str | None, run_cfg=None):
    """(TokenizerConfig, abstract params) for the AR task: --tokenizer-config, else the run
    config's tokenizer checkpoint's config.json, else configs/tokenizer_v1.py."""
    from dar_jax import tokenizer as tok
    from dar_jax.checkpoint import store
    if not path and run_cfg is not None and "tokenizer" in run_cfg and run_cfg.tokenizer.checkpoint:
        ckpt = run_cfg.tokenizer.checkpoint
        if os.path.exists(os.path.join(ckpt, store.CONFIG_FILE)):
            meta = store.read_model_meta(ckpt)
            cfg = tok.tokenizer_config(meta["config"])
            return cfg, tok.abstract_params(cfg), f"tokenizer config of {ckpt}"
    cfg, where = _tokenizer_from_config(path)
    return cfg, tok.abstract_params(cfg), where


def _tokenizer_from_config(path: str | None):
    """(TokenizerConfig of a tokenizer run config, where it came from); the default is
    ``configs/tokenizer_v1.py`` in the working directory."""
    from dar_jax.train.tokenizer_task import tokenizer_config_from_run
    if not path:
        path = DEFAULT_TOKENIZER_CONFIG
        if not os.path.isfile(path):
            raise AOTError(f"no tokenizer config: pass --tokenizer-config (the default, {path}, "
                           f"is not in the working directory {os.getcwd()})")
    return tokenizer_config_from_run(_load(path).model), f"tokenizer from {path}"


def _load(path: str, overrides=()):
    from dar_jax.config import load_config
    return load_config(path, list(overrides))


def train_program(cfg, devices, tokenizer_config: str | None = None) -> Program:
    """train.py's step for ``cfg`` on ``devices`` (the trainer's own lowering)."""
    import jax
    from dar_jax.train.loop import Trainer
    notes = []
    if cfg.task == "tokenizer":
        from dar_jax.train.tokenizer_task import TokenizerTask
        task = TokenizerTask(cfg, abstract_perceptual=True)
        notes.append("LPIPS (VGG16)" + (" and DINOv2-B/14 (REPA)" if task.dino else "")
                     + " with abstract weights")
    else:
        from dar_jax.train.ar_task import ARTask
        tokenizer = None
        if cfg.data.kind == "codes":   # pre-extracted codes: the step has no tokenizer
            cfg = cfg.copy_and_resolve_references()
            cfg.tokenizer.checkpoint = ""
        else:
            tok_cfg, tok_params, where = _abstract_tokenizer(tokenizer_config, cfg)
            tokenizer = (tok_cfg, tok_params)
            notes.append(f"images tokenized in the step ({where})")
        task = ARTask(cfg, tokenizer=tokenizer)
    trainer = Trainer(cfg, task, workdir=None, devices=devices)   # lowering only: no files
    gb = trainer.global_batch
    consts = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), task.consts())
    state, state_sh = trainer.abstract_state()
    lowered = trainer.lower_train_step(task.abstract_batch(gb), consts, state)
    return Program("train", lowered, gb, task.flops_per_example() * gb,
                   fsdp_min_bytes=_fsdp_min_bytes(state["params"]), remat=task.remat_policy,
                   compiler_options=trainer.compiler_options(), notes=notes)


def _fsdp_min_bytes(params) -> float:
    """Per device, the least FSDP traffic: each sharded parameter all-gathered in the forward
    and again in the backward pass, and its gradient reduce-scattered (3 x (k-1)/k x bytes)."""
    total = 0.0
    for p in jax_leaves(params):
        k = math.prod(p.shape) // max(math.prod(p.sharding.shard_shape(p.shape)), 1)
        if k > 1:
            total += 3 * p.size * p.dtype.itemsize * (k - 1) / k
    return total


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def sample_program(gpt_cfg, tok_cfg, devices, batch: int, *, cfg_scale: float = 4.0,
                   solver: str = "adams2", num_steps: int | None = None) -> Program:
    """The sampling pipeline (AR generation with CFG, then the sequential decode of every step)
    as one program over ``devices`` (batch over all of them)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dar_jax import ar, parallel, pipeline
    from dar_jax import tokenizer as tok
    from dar_jax.ar import generation
    from dar_jax import solvers
    from dar_jax.tokenizer import sequential
    from dar_jax.train.ar_task import gpt_train_flops_per_example
    from dar_jax.train.tokenizer_task import diffusion_flops
    mesh = parallel.make_mesh({"data": -1}, devices)
    target = parallel.target_for(mesh)
    if batch % mesh.size:
        raise AOTError(f"--batch {batch} is not divisible by the {mesh.size} devices")
    pipeline.check_compatible(gpt_cfg, tok_cfg)
    num_steps = int(num_steps or tok_cfg.num_denoising_steps)
    solver = solvers.canonical(solver)
    n_tok = gpt_cfg.block_size
    st = generation._StaticOptions(num_tokens=n_tok, cfg_active=cfg_scale > 1.0, top_k=0, use_top_p=False,
                   greedy=False, cfg_interval=-1, target=target)
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    gpt_p = jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), ar.abstract_params(gpt_cfg))
    tok_p = jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), tok.abstract_params(tok_cfg))
    h, w = sequential.resolution(tok_cfg)
    labels = sds((batch,), jnp.int32, rows)
    keys = sds((batch, 2), jnp.uint32, NamedSharding(mesh, P("data", None)))

    def inputs(labels, keys):
        keys = jax.random.wrap_key_data(keys)
        return generation._TracedInputs(labels, keys, jnp.float32(cfg_scale), jnp.float32(cfg_scale),
                         jnp.float32(1.0), jnp.float32(1.0), jnp.zeros((batch, n_tok), jnp.int32),
                         jnp.int32(0))

    def whole(gpt_params, tok_params, labels, keys):
        inp = inputs(labels, keys)
        tokens = generation._generate(gpt_cfg, st, gpt_params, inp)
        noise = pipeline.decode_noise(inp.keys, h, w)
        model = tok.bind(tok_cfg, tok_params)
        cond = model.decoder_layers_forward(tok.quantizer.lookup(tokens, model.codebook[...]),
                                            target=target)
        kv = model.diff.prepare_cond(cond, target)
        return sequential._integrate(tok_params, kv, noise, solvers.init_history(noise), jnp.int32(0),
                       jnp.int32(num_steps), cfg=tok_cfg, solver=solver, num_steps=num_steps,
                       with_state=False, target=target)

    lowered = jax.jit(whole, out_shardings=NamedSharding(mesh, P("data"))).lower(
        gpt_p, tok_p, labels, keys)
    nfe = {"euler": 1, "adams2": 1, "dpmpp_2m": 1, "heun": 2}.get(solver, 1)
    # analytic: 2 FLOPs per weight per row and token (forward only), attention over the cache
    gpt_fwd = gpt_train_flops_per_example(gpt_cfg) / 3.0
    dec = diffusion_flops(tok_cfg, h, w) * num_steps * nfe
    flops = batch * (gpt_fwd * (2 if st.cfg_active else 1) + dec)
    return Program("sample", lowered, batch, flops,
                   notes=[f"CFG {cfg_scale}, {solver}, {num_steps} decoder steps; {n_tok} tokens "
                          "(KV-cache decode kernel FLOPs counted over the whole cache)"])


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def analyse(program: Program, topology: Topology, devices, *, save: str | None = None,
            hlo_path: str | None = None) -> dict:
    """Compiles ``program`` and returns the report (see the module docstring)."""
    chip = topology.chip
    n_dev = len(devices)
    per_chip = max(n_dev // topology.num_chips, 1)            # devices per chip (v4: 2 cores)
    capacity = compiler_hbm_gib(devices[0])
    cap_source = "compiler"
    if capacity is None:
        capacity, cap_source = chip.hbm_gib / per_chip, "constant"
    report: dict[str, Any] = {
        "topology": topology.name, "jax_topology": topology.jax_name, "num_chips": topology.num_chips,
        "num_devices": n_dev, "program": program.name, "global_batch": program.global_batch,
        "per_chip_batch": program.global_batch / topology.num_chips,
        "hbm_capacity_gib": round(capacity * per_chip, 2), "hbm_capacity_source": cap_source,
        "model_flops_per_chip": program.model_flops / topology.num_chips, "notes": program.notes}
    if program.remat is not None:
        report["remat"] = program.remat
    if program.compiler_options:
        report["compiler_options"] = program.compiler_options
    t0 = time.perf_counter()
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # out of memory is a result
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
            raise
        report.update(fits=False, compiler_message=msg.splitlines()[0][:500],
                      compile_seconds=round(time.perf_counter() - t0, 1))
        need = _gib_from(_HBM_REQUIRED, msg)
        if need is not None:
            report["hbm_per_chip_gib"] = round(need * per_chip, 2)
            report["hbm_note"] = "HLO temporaries alone, from the compiler's message"
        return report
    report["compile_seconds"] = round(time.perf_counter() - t0, 1)
    mem = compiled.memory_analysis()
    used = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    report["hbm_per_chip_gib"] = round(used / GIB * per_chip, 3)
    report["hbm_breakdown_gib"] = {k: round(getattr(mem, f"{k}_size_in_bytes") / GIB * per_chip, 3)
                                   for k in ("argument", "temp", "output", "alias")}
    report["fits"] = bool(used / GIB <= capacity)
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    kernels = attention_kernels(hlo)
    report["attention_kernels"] = kernels
    report["attention_sites_on_xla"] = sum(1 for k in kernels.values() if k == "xla")
    # costs through the loops of the optimized HLO (cost_analysis counts a loop body once)
    costs = hlo_costs(hlo, n_dev, top=5)
    ca = _cost(compiled)
    report["cost_analysis_flops_per_chip"] = float(ca.get("flops", 0.0)) * per_chip
    report["cost_analysis_bytes_per_chip"] = float(ca.get("bytes accessed", 0.0)) * per_chip
    flops = costs["flops"] + costs["kernel_flops"]
    hbm = costs["hbm_bytes"]
    coll = costs["collectives"]
    report["xla_flops_per_chip"] = flops * per_chip
    report["kernel_flops_per_chip"] = costs["kernel_flops"] * per_chip
    report["remat_overhead"] = (round(flops * n_dev / program.model_flops, 4)
                                if program.model_flops else None)
    report["hbm_bytes_per_step"] = hbm * per_chip
    report["hbm_top"] = {f"{name} ({op})": round(b * per_chip / 1e9, 3)
                         for b, _, name, op, _ in costs["top_hbm"]}   # GB per step
    report["windowed_einsum_loops"] = windowed_einsum_loops(hlo)
    report["collectives"] = {k: v * per_chip for k, v in coll.items()}
    if costs["unknown_trip_counts"]:
        report["loops_counted_once"] = costs["unknown_trip_counts"]
    if costs["unknown_kernels"]:
        report["kernels_without_flops"] = costs["unknown_kernels"]
    total_coll = sum(coll.values()) * per_chip
    if program.fsdp_min_bytes:
        report["fsdp_min_bytes"] = program.fsdp_min_bytes * per_chip
        report["collective_ratio"] = round(total_coll / report["fsdp_min_bytes"], 3)
    peak = chip.peak_tflops * 1e12
    t_compute = flops * per_chip / peak
    t_memory = hbm * per_chip / (chip.hbm_tbps * 1e12)
    t_comm = total_coll / (chip.ici_gbps * 1e9)
    est = max(t_compute, t_memory) + t_comm
    report["est_step_s"] = est
    report["est_bound"] = "compute" if t_compute >= t_memory else "memory"
    report["est_mfu"] = round(report["model_flops_per_chip"] / (est * peak), 4) if est else None
    if program.name == "sample":
        report["est_images_per_s"] = program.global_batch / est if est else None
    if save:
        _save(compiled, save)
        report["saved"] = save
    return report


def _save(compiled, path: str) -> None:
    """The serialized executable (jax.experimental.serialize_executable), written atomically."""
    from jax.experimental.serialize_executable import serialize
    import pickle
    from dar_jax import io
    payload, in_tree, out_tree = serialize(compiled)
    io.write_file(path, lambda f: pickle.dump({"executable": payload, "in_tree": in_tree,
                                                "out_tree": out_tree}, f))


def format_table(report: dict) -> str:
    """The report as two aligned columns."""
    rows = []
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
        elif isinstance(value, list):
            value = "; ".join(map(str, value))
        rows.append((key, _fmt(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dar_jax.aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", required=True, help="Cloud TPU slice: v5p-32, v5e-256, v4-8, "
                    "v6e-64 (v4/v5p count cores, v5e/v6e chips) or a shape such as v5p:2x2x4")
    ap.add_argument("--program", default="train", choices=["train", "sample"])
    ap.add_argument("--config", help="run config (configs/*.py) for --program train")
    ap.add_argument("--tokenizer-config", default=None,
                    help="tokenizer run config: the AR task's frozen tokenizer (train) or the "
                         "decoder (sample); default configs/tokenizer_v1.py")
    ap.add_argument("--gpt-config", default="GPT-XL",
                    help="sample: a run config file or a size name (GPT-B/L/XL/XXL)")
    ap.add_argument("--batch", type=int, default=0, help="sample: images per program")
    ap.add_argument("--cfg-scale", type=float, default=4.0, help="sample: guidance (> 1: CFG rows)")
    ap.add_argument("--solver", default="adams2")
    ap.add_argument("--steps", type=int, default=0, help="sample: decoder steps (0: the tokenizer's)")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--save", default=None, help="write the serialized compiled program here")
    ap.add_argument("--hlo", default=None, help="write the optimized HLO text here")
    return ap


def _gpt_config(spec: str):
    from dar_jax import ar
    from dar_jax.train.ar_task import gpt_config_from_run
    if spec in ar.GPT_SIZES:
        return ar.gpt_config(spec, dtype="bfloat16")
    return gpt_config_from_run(_load(spec).model)


def run(args, overrides) -> dict:
    topology = parse_topology(args.topology)
    if args.program == "train":
        if not args.config:
            raise AOTError("--program train needs --config")
        cfg = _load(args.config, overrides)
    elif overrides:
        raise AOTError(f"--config.* overrides apply to --program train only: {overrides}")
    devices = tpu_devices(topology)
    if args.program == "train":
        program = train_program(cfg, devices, args.tokenizer_config)
    else:
        if args.batch < 1:
            raise AOTError("--program sample needs --batch (images per program)")
        tok_cfg, _ = _tokenizer_from_config(args.tokenizer_config)
        program = sample_program(_gpt_config(args.gpt_config), tok_cfg, devices, args.batch,
                                 cfg_scale=args.cfg_scale, solver=args.solver,
                                 num_steps=args.steps or None)
    report = analyse(program, topology, devices, save=args.save, hlo_path=args.hlo)
    report["command"] = " ".join(["python -m dar_jax.aot"] + list(args.argv))
    print(format_table(report))
    if args.json:
        from dar_jax import io
        io.write_json(args.json, report, default=str)
    return report


def parse_args(argv):
    args, rest = build_parser().parse_known_args(argv)
    args.argv = list(argv)   # the command line the report names
    overrides, bad = [], []
    for item in rest:
        (overrides if item.startswith("--config.") and "=" in item else bad).append(item)
    if bad:
        build_parser().error(f"unrecognized arguments: {' '.join(bad)} "
                             "(overrides look like --config.mesh.fsdp=16)")
    return args, overrides


def main(argv=None) -> int:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

    def go():
        try:
            run(args, overrides)
        except (TopologyError, AOTError) as e:
            raise ConfigError(str(e)) from None

    from dar_jax.cli import guarded_main
    return guarded_main(go)


if __name__ == "__main__":
    sys.exit(main())
