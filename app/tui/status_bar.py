"""The status bar: model · engine · placement, then prefill/decode tok/s │ memory │ cache."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

from moechat.backends.engines.events import Event

MODEL_CHARS = 40  # longer names are cut
CACHE_WORDS = ("hit", "miss", "cache", "expert", "prefetch", "disk", "read_gb")  # stats worth a status-bar slot


def format_bytes(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def format_stat(key: str, value) -> str:
    if isinstance(value, float):
        text = f"{value:.0%}" if "rate" in key and 0 <= value <= 1 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{key.replace('_', ' ')} {text}"


def prompt_summary(stats: dict) -> str:
    """Prompt tokens evaluated vs taken from the KV cache: restored from a saved state
    (kv_states), or kept from this process's last reply."""
    evaluated = stats.get("prompt_tokens_evaluated")
    if evaluated is None:
        return ""
    restored = int(stats.get("prompt_tokens_restored", 0))
    kept = int(stats.get("prompt_tokens_reused", 0)) - restored
    parts = [f"prompt {evaluated} evaluated"]
    if restored:
        parts.append(f"{restored} restored")
    if kept > 0:
        parts.append(f"{kept} kept")
    return " · ".join(parts)


class StatusBar(Static):
    model = reactive("no model")
    engine = reactive("")
    placement = reactive("")
    prefill_tok_s = reactive(0.0)
    decode_tok_s = reactive(0.0)
    predicted_decode_tok_s = reactive(0.0)  # the cost model's figure for this placement
    rss_bytes = reactive(0)
    threads = reactive(0)  # CPU threads the engine used for the last reply (0: not said)
    stats: reactive[dict] = reactive(dict, always_update=True)
    note = reactive("")  # "loading…", "generating…"

    def show_event(self, event: Event) -> None:
        if event.prefill_tok_s:
            self.prefill_tok_s = event.prefill_tok_s
        if event.decode_tok_s:
            self.decode_tok_s = event.decode_tok_s
        if event.rss_bytes:
            self.rss_bytes = event.rss_bytes
        if event.stats:
            self.stats = dict(event.stats)
            if isinstance(event.stats.get("threads"), int):
                self.threads = event.stats["threads"]

    def render(self) -> str:
        """Two lines: what runs where, then the numbers of the last reply."""
        model = self.model if len(self.model) <= MODEL_CHARS else self.model[:MODEL_CHARS - 1] + "…"
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        head = " · ".join(p for p in (model, self.engine, self.placement, threads, self.note) if p)
        numbers = []
        if self.prefill_tok_s or self.decode_tok_s:
            prefill = f"{self.prefill_tok_s:.1f}" if self.prefill_tok_s else "–"
            decode = f"decode {self.decode_tok_s:.1f} tok/s"
            if self.predicted_decode_tok_s:
                share = self.decode_tok_s / self.predicted_decode_tok_s
                decode += f" ({share:.0%} of the predicted {self.predicted_decode_tok_s:.1f})"
            numbers.append(f"prefill {prefill} tok/s · {decode}")
        if prompt_summary(self.stats):
            numbers.append(prompt_summary(self.stats))
        if self.rss_bytes:
            numbers.append(f"mem {format_bytes(self.rss_bytes)}")
        cache = [format_stat(k, v) for k, v in self.stats.items()
                 if any(w in k for w in CACHE_WORDS) and not isinstance(v, str)]
        if cache:
            numbers.append(" · ".join(cache))
        return head + "\n" + (" │ ".join(numbers) or "no reply yet")
