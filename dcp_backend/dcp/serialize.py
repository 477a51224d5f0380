"""A compact, versioned binary format for DCP plans (no pickle: safe to load from another process).

Layout: ``b"DCPPLAN\\0"``, a little-endian uint16 format version, a uint32 header length, the header
(UTF-8 JSON: metadata, stores and instructions, arrays referred to by index), then the raw arrays,
each stored as int32 when its values fit (else int64), 8-byte aligned. ``ranks`` limits the programs
to those ranks (what one rank needs at run time); the placement and schedules are always kept, so a
loaded plan has local indices for every rank and can be verified when all programs are present.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.blocks import build_blocks
from dcp_backend.dcp.compile import compile_programs
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.dcp.instructions import (Attention, Comm, CommOp, DeviceProgram, Fill, Reduce, StoreSpec,
                                          Wait)
from dcp_backend.dcp.partition import Placement
from dcp_backend.dcp.plan import DCPPlan, partial_wire
from dcp_backend.dcp.schedule import PassSchedule, Transfers
from dcp_backend.kernels.work import AttnWork
from dcp_backend.topology import Topology
from dcp_backend.spec import AttentionSpec
from dcp_backend.errors import CPError

MAGIC = b"DCPPLAN\0"
VERSION = 3  # 2: a store's wire class (partial results in the model dtype), the placement's source; 3: result
# rows of an attention and a fill apart from its input rows (result stores have slots of their own); versions 1
# and 2 still load (their result rows are the input rows)
READABLE = (1, 2, 3)
_TRANSFER_FIELDS = ("kind", "block", "src", "dst", "stage", "phase")


class _Writer:
    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def add(self, a) -> int:
        a = np.asarray(a)
        if a.dtype.kind in "iu":
            a = a.astype(np.int32) if a.size == 0 or (a.min() >= -(2**31) and a.max() < 2**31) else a.astype(np.int64)
        else:
            a = a.astype(np.float64)
        self.arrays.append(np.ascontiguousarray(a))
        return len(self.arrays) - 1


def _program(w: _Writer, p: DeviceProgram) -> dict:
    ins = []
    for i in p.instructions:
        if isinstance(i, Comm):
            ins.append({"t": "comm", "key": i.key,
                        "sends": [[o.peer, [[n, w.add(r)] for n, r in o.parts]] for o in i.sends],
                        "recvs": [[o.peer, [[n, w.add(r)] for n, r in o.parts]] for o in i.recvs]})
        elif isinstance(i, Wait):
            ins.append({"t": "wait", "key": i.key})
        elif isinstance(i, Attention):
            ins.append({"t": "attn", "stage": i.stage, "backward": i.backward, "q_rows": w.add(i.q_rows),
                        "kv_rows": w.add(i.kv_rows), "cu_q": w.add(i.work.cu_q), "cu_k": w.add(i.work.cu_k),
                        "ranges": w.add(i.work.ranges), "comps": w.add(i.comps), "fresh": w.add(i.fresh),
                        "q_out_rows": w.add(i.q_out_rows), "kv_out_rows": w.add(i.kv_out_rows)})
        elif isinstance(i, Fill):
            ins.append({"t": "fill", "stores": list(i.stores), "rows": w.add(i.rows), "of_rows": w.add(i.of_rows)})
        elif isinstance(i, Reduce):
            ins.append({"t": "reduce", "op": i.op, "src": list(i.src), "dst": list(i.dst),
                        "src_rows": w.add(i.src_rows), "dst_rows": w.add(i.dst_rows)})
        else:  # pragma: no cover
            raise CPError(f"cannot serialise instruction {type(i).__name__}")
    stores = {n: [s.rows, s.heads, s.with_dim, s.dtype, s.wire] for n, s in p.stores.items()}
    return {"device": p.device, "num_local_tokens": p.num_local_tokens, "stores": stores, "instructions": ins}


def _schedule(w: _Writer, s: PassSchedule) -> dict:
    return {"num_stages": s.num_stages, "comp_stage": w.add(s.comp_stage),
            "inputs": {f: w.add(getattr(s.inputs, f)) for f in _TRANSFER_FIELDS},
            "outputs": {f: w.add(getattr(s.outputs, f)) for f in _TRANSFER_FIELDS}}


def serialize(plan: DCPPlan, ranks=None, with_timings: bool = True) -> bytes:
    """Bytes of ``plan`` (all programs, or only those of ``ranks``). Without timings, equal plans give
    equal bytes."""
    ranks = list(range(plan.world_size)) if ranks is None else sorted(set(int(r) for r in ranks))
    w = _Writer()
    spec = plan.spec
    header = {
        "seqlens": plan.batch.seqlens.tolist(),
        "spec": {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                 "mask": spec.mask, "mask_args": dict(spec.mask_args), "softmax_scale": spec.softmax_scale},
        # the options with the topology, in the order of format version 1 (world_size, kernel, devices_per_node,
        # then the DCP options), so files stay readable both ways
        "options": {"world_size": plan.world_size, "kernel": plan.options.kernel,
                    "devices_per_node": plan.devices_per_node,
                    **{k: v for k, v in plan.options.as_dict().items() if k != "kernel"}},
        "world_size": plan.world_size,
        "block_size": plan.block_size,
        "devices_per_node": plan.devices_per_node,
        "timings": {k: v for k, v in plan.timings.items() if k != "compile"} if with_timings else {},
        "owner": w.add(plan.placement.owner),
        "comp_device": w.add(plan.placement.comp_device),
        "placement_source": plan.placement.source,
        "comp_cost": w.add(plan.comp_cost),
        "fwd": _schedule(w, plan.fwd),
        "bwd": _schedule(w, plan.bwd),
        "programs": {str(r): [_program(w, plan.fwd_programs[r]), _program(w, plan.bwd_programs[r])] for r in ranks},
        "arrays": [],
    }
    body = bytearray()
    for a in w.arrays:
        pad = (-len(body)) % 8
        body += b"\0" * pad
        header["arrays"].append([a.dtype.str, list(a.shape), len(body)])
        body += a.tobytes()
    hj = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<HI", VERSION, len(hj)) + hj + bytes(body)


def deserialize(data: bytes) -> DCPPlan:
    """Rebuild a plan from :func:`serialize` output (blocks are recomputed, they are deterministic)."""
    if not data.startswith(MAGIC):
        raise CPError("not a serialised DCP plan (bad magic)")
    version, hlen = struct.unpack_from("<HI", data, len(MAGIC))
    if version not in READABLE:
        raise CPError(f"serialised DCP plan has format version {version}; this build reads versions {READABLE}")
    start = len(MAGIC) + 6
    header = json.loads(data[start:start + hlen].decode())
    body = memoryview(data)[start + hlen:]
    arrays = []
    for dt, shape, off in header["arrays"]:
        dtype = np.dtype(dt)
        count = int(np.prod(shape)) if shape else 1
        a = np.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape)
        arrays.append(a.astype(np.int64) if dtype.kind in "iu" else a.astype(np.float64))

    def A(i):
        return arrays[i]

    s = header["spec"]
    spec = AttentionSpec(s["num_heads"], s["num_kv_heads"], s["head_dim"], mask=s["mask"], mask_args=s["mask_args"],
                         softmax_scale=s["softmax_scale"])
    opts = dict(header["options"])
    opts.pop("world_size", None)
    opts.pop("devices_per_node", None)
    options = DCPOptions(**opts)
    batch = PackedBatch.from_seqlens(header["seqlens"])
    bs = build_blocks(batch, spec, header["block_size"], options.head_block_size)
    world = header["world_size"]
    topology = Topology(world, header["devices_per_node"])
    pl = Placement(A(header["owner"]), A(header["comp_device"]), world, header["devices_per_node"],
                   source=header.get("placement_source", "hypergraph"))

    def sched(d):
        tr = lambda x: Transfers(*(A(x[f]) for f in _TRANSFER_FIELDS))  # noqa: E731
        return PassSchedule(A(d["comp_stage"]), tr(d["inputs"]), tr(d["outputs"]), d["num_stages"])

    def program(d) -> DeviceProgram:
        p = DeviceProgram(d["device"], d["num_local_tokens"])
        p.stores = {n: StoreSpec(n, *v[:5]) for n, v in d["stores"].items()}
        for i in d["instructions"]:
            t = i["t"]
            if t == "comm":
                ops = lambda lst: [CommOp(peer, [(n, A(a)) for n, a in parts]) for peer, parts in lst]  # noqa: E731
                p.instructions.append(Comm(i["key"], ops(i["sends"]), ops(i["recvs"])))
            elif t == "wait":
                p.instructions.append(Wait(i["key"]))
            elif t == "attn":
                work = AttnWork(A(i["cu_q"]), A(i["cu_k"]), A(i["ranges"]))
                out_rows = [A(i[k]) if k in i else None for k in ("q_out_rows", "kv_out_rows")]  # not in 1-2
                p.instructions.append(Attention(i["stage"], A(i["q_rows"]), A(i["kv_rows"]), work, A(i["comps"]),
                                                i["backward"], A(i["fresh"]), *out_rows))
            elif t == "fill":
                of_rows = A(i["of_rows"]) if "of_rows" in i else None  # not in versions 1-2
                p.instructions.append(Fill(tuple(i["stores"]), A(i["rows"]), of_rows))
            elif t == "reduce":
                p.instructions.append(Reduce(i["op"], tuple(i["src"]), tuple(i["dst"]), A(i["src_rows"]),
                                             A(i["dst_rows"])))
            else:
                raise CPError(f"serialised DCP plan has an unknown instruction {t!r}")
        return p

    fwd_s, bwd_s = sched(header["fwd"]), sched(header["bwd"])
    layouts, fwd_p, bwd_p = compile_programs(bs, pl, fwd_s, bwd_s, eager=False,  # absent ones compile lazily
                                             partial_wire=partial_wire(options))
    for r, (fp, bp) in header["programs"].items():
        fwd_p[int(r)] = program(fp)
        bwd_p[int(r)] = program(bp)
    return DCPPlan(batch, spec, topology, options, blocks=bs, placement=pl, fwd=fwd_s, bwd=bwd_s, layouts=layouts,
                   fwd_programs=fwd_p, bwd_programs=bwd_p, timings=header["timings"],
                   comp_cost=A(header["comp_cost"]))
