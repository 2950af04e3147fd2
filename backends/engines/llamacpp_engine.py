"""The llama.cpp engine (llama-cpp-python): CPU only, all on the GPU, or MoE-aware.

MoE-aware is llama.cpp's `--n-cpu-moe N`: every non-expert weight on the GPU, the routed
expert tensors of the first N layers in system RAM (see llamacpp_overrides.py).

Threads: unless the user fixed a count, the engine picks the cores free right now, again
before each reply, and steps down a thread when a reply stalls (another process took a core):
plan/threads.py's AdaptiveThreads, shared with the torch engines; the count used is in each
final event's stats.

A multi-turn chat reuses the KV cache for the shared prefix: `Llama.generate` compares the
new prompt's tokens with the ones already evaluated and only evaluates the rest. Before
that, the KV state cache (kv_states.py, llamacpp_state.py) restores a longer saved prefix,
from this process or an earlier one; the sequence state is saved after a long prefill and
after each reply.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Literal

from moechat.backends.engines.engine import Message, Sampling
from moechat.backends.errors import MoechatError
from moechat.backends.engines.events import Event
from moechat.backends.model.model_card import ModelCard
from moechat.backends.engines.prompt import ChatTokenizer
from moechat.backends.plan.gpu_probes import gpu_offload_supported
from moechat.backends.plan.threads import AdaptiveThreads

PlacementKind = Literal["cpu", "gpu", "moe", "split"]


@dataclass(frozen=True, slots=True)
class LlamaCppPlacement:
    kind: PlacementKind
    n_cpu_moe: int = 0  # with kind == "moe": layers whose experts stay in RAM
    split: tuple[int, ...] = ()  # with kind == "split": layers on each RPC device, in order (rpc_engine.py)

    def describe(self, card: ModelCard) -> str:
        if self.kind == "split":
            return f"layers {card.n_layers - sum(self.split)} here + " + " + ".join(map(str, self.split)) + " on workers"
        if self.kind == "cpu":
            return "CPU only"
        if self.kind == "gpu":
            return "all on GPU"
        layers = len(card.expert_layers) or card.n_layers
        return f"experts of {min(self.n_cpu_moe, layers)}/{layers} layers in RAM"

    @property
    def n_gpu_layers(self) -> int:
        if self.kind == "split":  # llama.cpp offloads the last N layers (the output stays here)
            return sum(self.split)
        return 0 if self.kind == "cpu" else -1


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(
        self,
        card: ModelCard,
        placement: LlamaCppPlacement = LlamaCppPlacement("cpu"),
        n_ctx: int | None = None,
        threads: int | None = None,
        logits_all: bool = False,
        verbose: bool = False,
        ui: bool = False,
    ):
        import llama_cpp

        from moechat.backends.engines.llamacpp_log import install_log, last_error
        from moechat.backends.engines.llamacpp_overrides import cpu_moe_patterns, tensor_overrides_to_cpu

        self.card = card
        self.placement_spec = placement
        self.placement = placement.describe(card)
        if placement.kind not in ("cpu", "split") and not gpu_offload_supported():
            self.placement += " (this llama.cpp build has no GPU support: running on CPU)"
        self.n_ctx = n_ctx or min(card.context_length, 4096)
        self.thread_count = AdaptiveThreads(threads, ui=ui)  # threads=None: adapted to the load
        threads = self.thread_count.threads
        self.expected_token_s = 0.0  # the plan's seconds per decoded token, when it chose this
        self.kv_states = self._kv_store(card, placement)
        log = install_log(echo=verbose)
        patterns = cpu_moe_patterns(placement.n_cpu_moe) if placement.kind == "moe" else []
        try:
            with tensor_overrides_to_cpu(patterns):
                self.llm = llama_cpp.Llama(
                    model_path=card.path,
                    n_gpu_layers=placement.n_gpu_layers,
                    tensor_split=[float(n) for n in placement.split] or None,
                    n_ctx=self.n_ctx,
                    n_batch=min(512, self.n_ctx),
                    n_threads=threads,
                    n_threads_batch=threads,
                    logits_all=logits_all,
                    verbose=verbose,
                )
        except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
            why = last_error() or str(err)
            raise MoechatError(f"{card.path}: llama.cpp could not load the model ({why}; "
                               f"its log: {log})") from err
        self.thread_count.apply = lambda n: llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)
        self.tokenizer = ChatTokenizer(self.llm)
        self.template = self.tokenizer.template

    @property
    def threads(self) -> int:
        return self.thread_count.threads

    def _kv_store(self, card: ModelCard, placement: LlamaCppPlacement):
        from moechat.backends.engines.kv_states import KVStateStore, model_key
        from moechat.backends.engines.llamacpp_state import build_identity

        variant = f"{placement.kind}:{placement.n_cpu_moe} {build_identity()}"
        return KVStateStore(model_key(card.path, self.n_ctx, self.name, variant), card.name)

    def _restore(self, tokens: list[int]) -> int:
        """Restore the best saved state for this prompt -> tokens restored (0: none)."""
        from moechat.backends.engines.kv_states import common_prefix
        from moechat.backends.engines.llamacpp_state import restore

        live = min(common_prefix(self.llm.input_ids[: self.llm.n_tokens].tolist(), tokens), len(tokens) - 1)
        picked = self.kv_states.pick(tokens, live)
        if picked is None:
            return 0
        candidate, payload = picked
        keep = min(candidate.common, len(tokens) - 1)
        if not restore(self.llm, candidate.tokens, payload, keep):
            self.kv_states.reject(candidate, "llama.cpp could not load it")
            return 0
        self.kv_states.restored(candidate, keep)
        return keep

    def _save_state(self, force: bool = False) -> str:
        """Save the context's state -> its name (or the name of a saved state that already
        covers nearly all of it)."""
        from moechat.backends.engines.llamacpp_state import capture

        held = [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]
        covering = None if force else self.kv_states.covering(held)
        if covering is not None:
            return covering
        tokens, payload = capture(self.llm)
        return self.kv_states.save(tokens, payload)

    # ---- prompt -------------------------------------------------------------------------
    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return self.tokenizer.prompt_tokens(messages)

    # ---- generation ---------------------------------------------------------------------
    def generate(
        self, messages: list[Message], sampling: Sampling, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        import llama_cpp

        from moechat.backends.engines.kv_states import PREFILL_SAVE_MIN

        tokens = self.prompt_tokens(messages)
        if len(tokens) >= self.n_ctx:
            raise MoechatError(
                f"the conversation has {len(tokens)} tokens; the context holds {self.n_ctx}"
            )
        max_tokens = min(sampling.max_tokens, self.n_ctx - len(tokens))
        self.thread_count.begin_reply(self.expected_token_s)
        self.llm.set_seed(sampling.seed)
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        restored = self._restore(tokens)
        text_stream = self.tokenizer.text_stream()
        generated: list[int] = []
        finish = "length"
        t_start, t_first = time.perf_counter(), None
        stream = self.llm.generate(
            tokens,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=0.0,
            temp=sampling.temperature,
            repeat_penalty=1.0,
            reset=True,
        )
        t_prev = None
        try:
            for token in stream:
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    if llama_cpp.llama_perf_context(self.llm.ctx).n_p_eval >= PREFILL_SAVE_MIN:
                        self._save_state(force=True)  # a reply cut short still leaves the long prefill saved
                else:
                    self.thread_count.token(now - t_prev)  # a stall drops a thread
                t_prev = now
                if self.tokenizer.is_end(token):
                    finish = "stop"
                    break
                generated.append(token)
                decode_s = now - t_first
                yield Event(
                    text=text_stream.push(token),
                    token_ids=(token,),
                    prompt_tokens=len(tokens),
                    decode_tok_s=(len(generated) - 1) / decode_s if decode_s > 0 else 0.0,
                )
                if len(generated) >= max_tokens:
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
        finally:
            stream.close()
            self.thread_count.end_reply()
        ttft = (t_first or time.perf_counter()) - t_start
        final = self._final_event(len(tokens), ttft, text_stream.flush(), finish)
        saved = self._save_state()
        yield dataclasses.replace(final, stats={**final.stats, "prompt_tokens_restored": restored,
                                                "kv_state": saved})

    def _final_event(self, n_prompt: int, ttft: float, tail_text: str, finish: str) -> Event:
        """Totals from llama.cpp's own perf counters (read after a synchronize)."""
        import llama_cpp
        import psutil

        llama_cpp.llama_synchronize(self.llm.ctx)
        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        if perf.n_p_eval > 0 and perf.t_p_eval_ms > 0:
            prefill = perf.n_p_eval / perf.t_p_eval_ms * 1e3
        else:  # the prompt was cached but for a token, which llama.cpp counts as a decode
            prefill = max(1, n_prompt - self._reused(n_prompt, perf)) / ttft if ttft > 0 else 0.0
        decode = perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms > 0 else 0.0
        return Event(
            text=tail_text,
            prompt_tokens=n_prompt,
            prefill_tok_s=prefill,
            decode_tok_s=decode,
            rss_bytes=psutil.Process().memory_info().rss,
            stats={
                "placement": self.placement,
                "prompt_tokens_evaluated": n_prompt - self._reused(n_prompt, perf),
                "prompt_tokens_reused": self._reused(n_prompt, perf),
                "decoded_tokens": int(perf.n_eval),
                **self.thread_count.stats(),
            },
            finish_reason=finish,
        )

    @staticmethod
    def _reused(n_prompt: int, perf) -> int:
        """Prompt tokens served from the KV cache (a fully cached prompt still re-evaluates
        its last token, which llama.cpp counts as a decode rather than a prompt token)."""
        evaluated = int(perf.n_p_eval) or 1
        return max(0, n_prompt - evaluated)

    def close(self) -> None:
        if getattr(self, "kv_states", None) is not None:
            self.kv_states.wait()  # a state being written reaches the disk whole
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()
