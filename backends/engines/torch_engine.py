"""The torch engine: moechat's own PyTorch runtime (backends/runtime) behind the Engine
protocol, so `--engine torch`, `moechat ask` and the TUI work unchanged.

Same GGUF, same tokenizer (llama.cpp's, vocab only) as the llama.cpp engine; a multi-turn
chat reuses the KV cache for the prefix the new prompt shares with what was evaluated, and
the KV state cache (kv_states.py) restores a longer saved prefix, from this process or an
earlier one: the cache's K/V tensors are saved after a long prefill and after each reply.

Threads as in the llama.cpp engine (plan/threads.py's AdaptiveThreads): chosen from the load
unless fixed, again before each reply, one less when a reply stalls; what changes is ggml's
thread pool, the one the heavy products run in (on a GPU, torch's CPU pool follows it too).
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from moechat.backends.engines.engine import Message, Sampling
from moechat.backends.errors import MoechatError
from moechat.backends.engines.events import Event
from moechat.backends.model.model_card import ModelCard


PREFILL_CHUNK = 256  # bounds the prefill's intermediate buffers


class TorchEngine:
    name = "torch"

    expected_token_s = 0.0  # the plan's seconds per decoded token, when it chose this engine

    def __init__(self, card: ModelCard, n_ctx: int | None = None, threads: int | None = None,
                 device: str | None = None, expert_backend=None, ui: bool = False):
        import torch

        from moechat.backends.plan.threads import AdaptiveThreads
        from moechat.backends.engines.prompt import ChatTokenizer
        from moechat.backends.runtime import load_model
        from moechat.backends.runtime.model import default_device

        self.card = card
        self.n_ctx = n_ctx or min(card.context_length, 4096)
        self.device = device or default_device()
        self.thread_count = AdaptiveThreads(threads, ui=ui)  # threads=None: adapted to the load
        threads = self.thread_count.threads
        # On the CPU the heavy products run in ggml's own thread pool; torch only does small
        # ops, and a second busy OpenMP pool would fight ggml's for the same cores.
        torch.set_num_threads(1 if self.device == "cpu" else threads)
        self.model = load_model(card.path, self.device, threads=threads, expert_backend=expert_backend,
                                max_tokens=self.n_ctx)
        self.thread_count.apply = self._set_threads
        self.tokenizer = ChatTokenizer.open(card.path)
        self.cache = self.model.new_cache(self.n_ctx)
        self.evaluated: list[int] = []  # tokens whose keys/values are in the cache
        self.kv_states = None  # made on the first reply: an offload engine's placement comes later
        self.placement = "CPU, ggml kernels on the GGUF's quantized bytes" if self.device == "cpu" else self.device

    @property
    def threads(self) -> int:
        return self.thread_count.threads

    def _set_threads(self, n: int) -> None:
        import torch

        self.model.cpu_kernels.set_threads(n)
        if self.device != "cpu":  # on the CPU torch keeps one thread (see __init__)
            torch.set_num_threads(n)

    def io_wait_s(self) -> float:
        """Seconds this engine's forward steps have waited on anything but the CPU (the stream
        engine: disk reads), in all; fewer threads would not shorten that wait."""
        return 0.0

    def _kv_store(self, card: ModelCard):
        from moechat.backends.engines.kv_states import KVStateStore, model_key

        k = self.cache.k[0] if isinstance(self.cache.k, list) else self.cache.k  # a sliding cache: per layer
        variant = f"{self.device} {k.dtype} {self.kv_variant()}"
        return KVStateStore(model_key(card.path, self.n_ctx, self.name, variant), card.name)

    def kv_variant(self) -> str:
        """What else changes the keys and values this engine computes (offload engines:
        their expert placement)."""
        return ""

    def _restore(self, tokens: list[int], live: int) -> int:
        """Restore the best saved state for this prompt -> tokens restored (0: none)."""
        if not getattr(self.cache, "savable", False):
            return 0
        picked = self.kv_states.pick(tokens, live)
        if picked is None:
            return 0
        candidate, payload = picked
        keep = min(candidate.common, len(tokens) - 1)
        # a sliding-window ring keeps only the window before its end: a state saved too far
        # past `keep` cannot serve it (and must not replace the live cache)
        if not self.cache.restorable(payload, keep):
            return 0
        if not self.cache.load(payload, len(candidate.tokens)):
            self.kv_states.reject(candidate, "its tensors do not fit this model's KV cache")
            return 0
        keep = self.cache.truncate(keep)
        self.evaluated = list(tokens[:keep])
        self.kv_states.restored(candidate, keep)
        return keep

    def _save_state(self, force: bool = False) -> str:
        """Save the cache -> its name (or that of a saved state covering nearly all of it)."""
        if not getattr(self.cache, "savable", False):
            return ""
        covering = None if force else self.kv_states.covering(self.evaluated)
        if covering is not None:
            return covering
        n = len(self.evaluated)
        return self.kv_states.save(self.evaluated[:n], self.cache.export(n))

    def forward(self, tokens: list[int], start: int, all_logits: bool = False):
        """Evaluate tokens at positions start.. (in chunks of PREFILL_CHUNK) -> logits."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(tokens), PREFILL_CHUNK):
                chunk = torch.tensor(tokens[i : i + PREFILL_CHUNK], dtype=torch.long)
                out.append(self.model.forward(chunk, self.cache, start + i, all_logits))
        if torch.device(self.model.device).type == "cuda":
            torch.cuda.synchronize()  # queued GPU work is part of this step's time
        del self.evaluated[start:]
        self.evaluated.extend(tokens)
        return torch.cat(out) if all_logits else out[-1]

    def generate(self, messages: list[Message], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        import psutil
        import torch

        from moechat.backends.runtime.sampling import sample

        tokens = self.tokenizer.prompt_tokens(messages)
        if len(tokens) >= self.n_ctx:
            raise MoechatError(f"the conversation has {len(tokens)} tokens; the context holds {self.n_ctx}")
        max_tokens = min(sampling.max_tokens, self.n_ctx - len(tokens))
        generator = torch.Generator().manual_seed(sampling.seed)
        self.thread_count.begin_reply(self.expected_token_s)

        from moechat.backends.engines.kv_states import PREFILL_SAVE_MIN, common_prefix

        if self.kv_states is None:
            self.kv_states = self._kv_store(self.card)
        reused = min(common_prefix(self.evaluated, tokens), len(tokens) - 1)
        restored = self._restore(tokens, reused)
        reused = max(reused, restored)  # the last prompt token is evaluated for its logits
        reused = self.cache.truncate(reused)  # a sliding-window cache may keep less
        t0 = time.perf_counter()
        logits = self.forward(tokens[reused:], reused)[-1]
        prefill_s = time.perf_counter() - t0
        if len(tokens) - reused >= PREFILL_SAVE_MIN:
            self._save_state(force=True)  # a reply cut short still leaves the long prefill saved
        prefill_tok_s = (len(tokens) - reused) / prefill_s if prefill_s > 0 else 0.0

        text_stream = self.tokenizer.text_stream()
        generated: list[int] = []
        finish, decode_s, n_decoded = "length", 0.0, 0
        pos = len(tokens)
        while True:
            token = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
            if self.tokenizer.is_end(token):
                finish = "stop"
                break
            generated.append(token)
            yield Event(text=text_stream.push(token), token_ids=(token,), prompt_tokens=len(tokens), prefill_tok_s=prefill_tok_s,
                        decode_tok_s=n_decoded / decode_s if decode_s > 0 else 0.0)
            if len(generated) >= max_tokens or pos >= self.n_ctx:
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            t1, waited = time.perf_counter(), self.io_wait_s()
            logits = self.forward([token], pos)[-1]
            token_s = time.perf_counter() - t1
            decode_s += token_s
            n_decoded += 1
            pos += 1
            # a stall (a core taken) drops a thread; time spent waiting on reads is no stall
            self.thread_count.token(token_s - (self.io_wait_s() - waited))
        self.thread_count.end_reply()  # the next reply's default sees the load from here
        saved = self._save_state()
        yield Event(
            text=text_stream.flush(),
            prompt_tokens=len(tokens),
            prefill_tok_s=prefill_tok_s,
            decode_tok_s=n_decoded / decode_s if decode_s > 0 else 0.0,
            rss_bytes=psutil.Process().memory_info().rss,
            stats={
                "placement": self.placement,
                "prompt_tokens_evaluated": len(tokens) - reused,
                "prompt_tokens_reused": reused,
                "prompt_tokens_restored": restored,
                "decoded_tokens": n_decoded,
                "kv_state": saved,
                **self.thread_count.stats(),
            },
            finish_reason=finish,
        )

    def close(self) -> None:
        if getattr(self, "kv_states", None) is not None:
            self.kv_states.wait()  # a state being written reaches the disk whole
        tok, self.tokenizer = getattr(self, "tokenizer", None), None
        if tok is not None:
            tok.close()
        self.model = None

