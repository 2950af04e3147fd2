"""Workers as a tier of the cost model: layer splits across this machine and `moechat worker`s.

llama.cpp's RPC backend runs a split model as a pipeline: the first layers here, then each
worker's layers in turn (llama.cpp offloads the *last* `n_gpu_layers` layers, spread over
the RPC devices by `tensor_split`), the output layer back here. At batch 1 the stages run one
after the other, so a token costs the sum of every stage plus the hops between them:

    t_decode = sum over devices of (bytes read per token there / that device's rate
                                    + its per-layer op overheads)
             + per worker used: HOP_RTTS x round trip + activation bytes / link bandwidth
                                + RPC_CALL_S (serialising the graph split, server dispatch)

so a split of identical CPUs is never faster than one machine that holds the whole model:
it pays when the model does not fit here, or when a worker is faster (a GPU worker, a
faster machine). Prefill adds the same hops once per micro-batch and per token of
activations. The worker's own speeds come from its recorded profile (`machine`), or, when
there is none, this machine's stand in (the note says so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moechat.backends.plan import cost_model as cm

HOP_RTTS = 1.5  # per worker and token: a one-way send in, a get_tensor round trip out
RPC_CALL_S = 0.7e-3  # per worker and token: graph (de)serialisation, set/get, server dispatch; fitted on loopback (docs/benchmarks.md, issue 17)
ACT_BYTES = 4  # activations cross the link as float32


@dataclass(frozen=True)
class WorkerProfile:
    endpoint: str  # "host:port"
    free_bytes: int  # memory the worker offers (ggml's device memory, device 0)
    total_bytes: int
    rtt_s: float  # measured round trip of a tiny RPC request
    link_gbs: float  # measured bulk bandwidth to the worker, GB/s
    machine: object | None = None  # the worker's HardwareProfile when recorded, else None

    @classmethod
    def from_link(cls, link, machine=None) -> "WorkerProfile":
        dev = link.devices[0] if link.devices else None
        return cls(link.endpoint, dev.free_bytes if dev else 0, dev.total_bytes if dev else 0,
                   link.rtt_s, link.link_gbs, machine)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["machine"] = self.machine.to_dict() if self.machine is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerProfile":
        from moechat.backends.plan.hardware_profile import HardwareProfile

        d = dict(d)
        machine = d.pop("machine", None)
        return cls(**d, machine=HardwareProfile.from_dict(machine) if machine else None)


@dataclass(frozen=True)
class Split:
    layers: tuple[int, ...]  # layers here, then on each worker (sums to the model's layers)
    rule: str  # how it was chosen, for the table


def capacity_bytes(worker: WorkerProfile) -> int:
    return int(worker.free_bytes * cm.RAM_HEADROOM)


def worker_buffer_bytes(card) -> int:
    """A worker's compute buffer: activations of one micro-batch (no logits: those stay here)."""
    widest = max(card.ffn_size, card.expert_ffn_size * max(1, card.n_experts_used), card.hidden_size * 4)
    return cm.N_UBATCH * 4 * 2 * widest


def memory(card, split: Split, n_ctx: int) -> tuple[int, ...]:
    """Bytes needed on each device (here first): its layers, their KV cache, buffers."""
    kv_per_layer = cm.kv_bytes(card, n_ctx) // max(1, card.n_layers)
    bounds, start = [], 0
    for n in split.layers:
        bounds.append((start, start + n))
        start += n
    need = []
    for i, (a, b) in enumerate(bounds):
        weights = sum(cm.layer_bytes(card, layer) for layer in range(a, b))
        if i == 0:
            need.append(weights + cm.non_layer_bytes(card) + kv_per_layer * (b - a)
                        + cm.compute_buffer_bytes(card) + cm.RUNTIME_OVERHEAD_BYTES)
        else:
            need.append(weights + kv_per_layer * (b - a) + (worker_buffer_bytes(card) if b > a else 0))
    return tuple(need)


def fits(card, profile, workers, split: Split, n_ctx: int) -> bool:
    need = memory(card, split, n_ctx)
    return need[0] <= cm.ram_capacity_bytes(profile) and all(
        n <= capacity_bytes(w) for n, w in zip(need[1:], workers))


def _layer_seconds(card, machine, layer: int) -> float:
    """Decode seconds of one layer on a CPU machine: its bytes at the matvec rate + op costs."""
    read = sum(cm.read_bytes_per_token(card, t) / (cm.cpu_rate_gbs(machine, t.type_name) * 1e9)
               for t in card.tensors if t.layer == layer)
    return read + cm.cpu_layer_overhead_s(machine)


def hop_seconds(card, worker: WorkerProfile) -> float:
    link = max(worker.link_gbs, 1e-3) * 1e9
    return HOP_RTTS * worker.rtt_s + 2 * card.hidden_size * ACT_BYTES / link + RPC_CALL_S


def predict(card, profile, workers, split: Split, n_ctx: int = 4096) -> cm.Prediction:
    """Decode and prefill tok/s of one split (profile = this machine), and its memory here."""
    machines = [profile] + [w.machine or profile for w in workers]
    terms: dict[str, float] = {}
    layer, prefill_s = 0, 0.0
    for i, (n, machine) in enumerate(zip(split.layers, machines)):
        where = "here" if i == 0 else workers[i - 1].endpoint
        terms[f"layers {where}"] = sum(_layer_seconds(card, machine, x) for x in range(layer, layer + n))
        share = sum(cm.layer_bytes(card, x) for x in range(layer, layer + n)) / max(1, card.tensor_bytes)
        prefill_s += share * cm.prefill_seconds_per_token(card, machine, cm.Placement("cpu"))
        if i > 0 and n > 0:
            w = workers[i - 1]
            terms[f"hops to {where}"] = hop_seconds(card, w)
            link = max(w.link_gbs, 1e-3) * 1e9
            prefill_s += 2 * card.hidden_size * ACT_BYTES / link + (HOP_RTTS * w.rtt_s + RPC_CALL_S) / cm.N_UBATCH
        layer += n
    outside = sum(cm.read_bytes_per_token(card, t) / (cm.cpu_rate_gbs(profile, t.type_name) * 1e9)
                  for t in card.tensors if t.layer is None)
    terms["output + overheads here"] = outside + cm.CPU_TOKEN_OVERHEAD_S + cm.OPS_PER_TOKEN * profile.cpu_op_s
    prefill_s += cm.non_layer_bytes(card) / max(1, card.tensor_bytes) * cm.prefill_seconds_per_token(
        card, profile, cm.Placement("cpu"))
    need = memory(card, split, n_ctx)
    return cm.Prediction(1.0 / prefill_s, 1.0 / sum(terms.values()), need[0], 0, terms)


# ---- which splits to try ---------------------------------------------------------------------


def candidate_splits(card, profile, workers, n_ctx: int) -> list[Split]:
    """Layers proportional to what each device holds; the most layers here (fewest hops);
    fastest devices first; and an even split. Duplicates dropped, order kept."""
    L = card.n_layers
    kv_per_layer = cm.kv_bytes(card, n_ctx) // max(1, L)
    per_layer = max(1, (sum(cm.layer_bytes(card, x) for x in range(L)) // max(1, L)) + kv_per_layer)
    here_room = cm.ram_capacity_bytes(profile) - memory(card, Split((0,) + (0,) * len(workers), ""), n_ctx)[0]
    rooms = [max(0, here_room)] + [max(0, capacity_bytes(w) - worker_buffer_bytes(card)) for w in workers]
    caps = [min(L, room // per_layer) for room in rooms]
    splits = [Split(_proportional(L, rooms), "proportional to memory")]
    splits.append(Split(_fill(L, caps, range(len(caps))), "most layers here"))
    machines = [profile] + [w.machine or profile for w in workers]
    speed = [_layer_seconds(card, m, L // 2) + (hop_seconds(card, workers[i - 1]) / max(1, caps[i]) if i else 0)
             for i, m in enumerate(machines)]
    splits.append(Split(_fill(L, caps, sorted(range(len(caps)), key=lambda i: speed[i])), "fastest devices first"))
    splits.append(Split(_proportional(L, [1] * len(rooms)), "even"))
    seen, out = set(), []
    for s in splits:
        if s.layers not in seen and sum(s.layers[1:]) > 0:
            seen.add(s.layers)
            out.append(s)
    return out


def _proportional(total: int, weights) -> tuple[int, ...]:
    """Integers summing to total, proportional to weights (largest remainders)."""
    weights = [max(0, w) for w in weights]
    s = sum(weights) or 1
    exact = [total * w / s for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(out)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return tuple(out)


def _fill(total: int, caps, order) -> tuple[int, ...]:
    """Give each device in `order` as many layers as it holds until none are left; what
    does not fit anywhere goes to the last device (the split is then marked as not fitting)."""
    out, left = [0] * len(caps), total
    for i in order:
        out[i] = min(caps[i], left)
        left -= out[i]
    out[list(order)[-1]] += left
    return tuple(out)


def split_candidates(card, profile, workers, n_ctx: int):
    """Planner Candidates (placement "split") for each distinct split worth predicting."""
    from moechat.backends.plan.planner import Candidate

    gib = 2**30
    for split in candidate_splits(card, profile, workers, n_ctx):
        p = predict(card, profile, workers, split, n_ctx)
        need = memory(card, split, n_ctx)
        stand_in = [w.endpoint for w in workers if w.machine is None]
        note = (f"{split.rule}; " + ", ".join(f"{n} layers {need[i + 1] / gib:.1f}/{capacity_bytes(w) / gib:.1f} GiB "
                                            f"on {w.endpoint}" for i, (n, w) in enumerate(zip(split.layers[1:], workers)))
                + (f"; speeds of {', '.join(stand_in)} assumed equal to here" if stand_in else ""))
        yield Candidate(engine="llama.cpp", placement="split", n_cpu_moe=None,
                        prefill_tok_s=p.prefill_tok_s, decode_tok_s=p.decode_tok_s,
                        ram_bytes=need[0], vram_bytes=0, fits=fits(card, profile, workers, split, n_ctx),
                        available=True, note=note, split=split.layers,
                        workers=tuple(w.endpoint for w in workers))
