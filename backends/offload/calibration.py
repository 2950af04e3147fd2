"""Fiddler's calibration: how often each (layer, expert) is routed to, over a built-in set
of varied prompts (about 2k tokens), counted once per model file and cached.

The text is deliberately mixed — chat, code, maths, prose, lists, another language — since
experts specialise by content and a placement tuned on one kind of text would miss on others.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from moechat.backends.paths import cache_dir

CALIBRATION_VERSION = 1

CALIBRATION_PROMPTS = (
    "What is the capital of France? Answer in one sentence. The capital of France is Paris, "
    "a city on the Seine known for the Eiffel Tower, the Louvre and its cafés.",
    "Write a Python function that returns the n-th Fibonacci number.\n\n```python\n"
    "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fib(i) for i in range(10)])\n```\nThe loop keeps two running values, "
    "so it runs in linear time and constant memory.",
    "Solve for x: 3x + 7 = 22. Subtract 7 from both sides to get 3x = 15, then divide by 3: "
    "x = 5. Check: 3 * 5 + 7 = 15 + 7 = 22. Next, the area of a circle of radius 4 is "
    "pi * 4^2 = 16 pi, about 50.27 square units. The derivative of x^3 - 2x is 3x^2 - 2.",
    "Once upon a time, in a village at the edge of a great forest, there lived an old "
    "clockmaker who could repair anything but his own heart. Every morning he opened his "
    "shutters, wound the tall clock in the square, and waited for the baker's daughter to "
    "wave. One winter the clock stopped, and the whole village forgot what time it was.",
    "Here is a shopping list for the week:\n- 2 litres of milk\n- a dozen eggs\n- brown bread\n"
    "- apples, pears and bananas\n- rice, lentils and chickpeas\n- olive oil\n- coffee beans\n"
    "Remember to bring the reusable bags and to check whether the pharmacy is open on Sunday.",
    "Explain photosynthesis to a ten-year-old. Plants are like little kitchens: they take in "
    "sunlight, water from the soil and carbon dioxide from the air, and they cook up sugar to "
    "grow. The leftover oxygen goes back into the air, which is lucky for us, because we "
    "breathe it.",
    "Bonjour ! Je voudrais réserver une table pour deux personnes ce soir vers vingt heures. "
    "Est-ce que vous avez une terrasse ? Merci beaucoup, à tout à l'heure. Guten Tag, wie geht "
    "es Ihnen? Ich hätte gern einen Kaffee und ein Stück Kuchen, bitte.",
    "The French Revolution began in 1789 with the storming of the Bastille. It abolished the "
    "monarchy, proclaimed the rights of man and of the citizen, and was followed by the Terror, "
    "the Directory and finally the rise of Napoleon Bonaparte, who crowned himself emperor in "
    "1804. Its ideas of liberty, equality and fraternity spread across Europe.",
    "SELECT customers.name, COUNT(orders.id) AS n_orders\nFROM customers\nLEFT JOIN orders ON "
    "orders.customer_id = customers.id\nWHERE orders.created_at >= '2024-01-01'\nGROUP BY "
    "customers.name\nORDER BY n_orders DESC\nLIMIT 10;\nThis query lists the ten customers with "
    "the most orders this year, including customers without any order.",
    "User: my laptop fan is very loud when I open the browser, what can I do?\nAssistant: First "
    "check which tabs use the most CPU in the browser's task manager. Close heavy pages, disable "
    "extensions you do not need, and make sure the vents are not blocked by dust. If it stays "
    "loud, update the BIOS and the graphics driver.",
    "A haiku about autumn:\nRed leaves on the path,\nthe wind counts them one by one,\nnight "
    "comes a bit sooner.\nAnd a limerick: There once was a cat from Peru, who dreamed he was "
    "eating a shoe; he woke with a fright, in the middle of the night, and found that his dream "
    "had come true.",
    "To make bread, mix 500 g of flour, 350 ml of warm water, 10 g of salt and 7 g of dried "
    "yeast. Knead for ten minutes until the dough is smooth, let it rise for an hour, shape it, "
    "let it rise again for forty minutes, then bake at 230 degrees for about thirty minutes "
    "until the crust is golden and sounds hollow when tapped.",
    "JSON example: {\"name\": \"moechat\", \"version\": \"0.1.0\", \"engines\": [\"llama.cpp\", "
    "\"fiddler\", \"hobbit\"], \"gpu\": null}. In JavaScript: const total = items.reduce((sum, "
    "item) => sum + item.price * item.qty, 0); console.log(`Total: ${total.toFixed(2)}`);",
    "The mitochondria is the powerhouse of the cell. It produces ATP through oxidative "
    "phosphorylation, in which electrons move along a chain of proteins in the inner membrane, "
    "pumping protons and driving ATP synthase. Cells with high energy needs, such as muscle and "
    "nerve cells, contain thousands of mitochondria.",
    "Dear hiring manager, I am writing to apply for the position of data analyst. In my "
    "current role I built dashboards that cut our weekly reporting time in half, and I enjoy "
    "turning messy spreadsheets into clear answers. I would welcome the chance to discuss how "
    "I could help your team. Kind regards, Alex.",
    "Why is the sky blue? Sunlight contains all colours. Air molecules scatter short "
    "wavelengths, blue and violet, much more than red (Rayleigh scattering goes as one over the "
    "wavelength to the fourth power), so blue light reaches our eyes from every direction. At "
    "sunset the light crosses more air, the blue is scattered away, and the sky turns red.",

    "Rust example:\n```rust\nfn main() {\n    let words = vec![\"apple\", \"banana\", \"cherry\"];\n"
    "    for (i, w) in words.iter().enumerate() {\n        println!(\"{}: {}\", i, w.to_uppercase());\n"
    "    }\n}\n```\nOwnership means each value has one owner; borrowing with & lets functions read "
    "a value without taking it, and the compiler checks that no reference outlives its data.",
    "Meeting notes, Tuesday: the team agreed to ship version 2.3 on the 14th. Maria will finish "
    "the migration script, Tom will update the documentation and the changelog, and Priya will "
    "run the load tests on the staging cluster. Open questions: do we keep the old API endpoint "
    "for another release, and who answers the support tickets during the holidays?",
    "In economics, inflation is the rate at which the general level of prices rises. Central "
    "banks usually target about two percent a year. When inflation is high, they raise interest "
    "rates, which makes borrowing more expensive, slows spending and investment, and eventually "
    "cools prices, at the risk of higher unemployment in the short run.",
    "Q: A train leaves at 14:35 and arrives at 18:10. How long is the journey?\nA: From 14:35 to "
    "18:35 is 4 hours; 18:10 is 25 minutes earlier, so the journey takes 3 hours 35 minutes.\n"
    "Q: If 5 pencils cost 2.50 euros, how much do 8 cost?\nA: One pencil costs 0.50 euros, so "
    "8 cost 4.00 euros.",
    "La cuisine italienne varie beaucoup d'une région à l'autre : au nord, le beurre, le riz et "
    "la polenta ; au sud, l'huile d'olive, les tomates et les pâtes sèches. En español: la "
    "paella valenciana lleva arroz, pollo, conejo, judías verdes y azafrán, y se cocina en una "
    "sartén ancha y poco profunda.",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.log; do\n  gzip -9 \"$f\"\ndone\nfind . -name "
    "'*.gz' -mtime +30 -delete\necho \"done\"\nThis script compresses every log file in the "
    "current directory and deletes compressed logs older than thirty days.",
    "The Moon always shows the same face to the Earth because it is tidally locked: it turns "
    "once on its axis in the same time it takes to orbit us, about 27.3 days. Its phases come "
    "from the changing angle between the Sun, the Earth and the Moon, not from the Earth's "
    "shadow, which only falls on it during a lunar eclipse.",
    "Customer review: I bought these headphones for my commute. The noise cancelling is "
    "excellent on the train, the battery easily lasts a week, and the case is small. Two "
    "stars off because the ear cushions get warm after an hour and the app keeps asking me to "
    "create an account. Would I buy them again? Probably yes, on sale.",
    "Proof that the square root of 2 is irrational: suppose sqrt(2) = p/q in lowest terms. "
    "Then p^2 = 2 q^2, so p^2 is even and therefore p is even, say p = 2k. Then 4k^2 = 2q^2, "
    "so q^2 = 2k^2 and q is even too, contradicting lowest terms. Hence sqrt(2) is irrational.",
)


def model_file_key(path: str | os.PathLike) -> str:
    """A short key for a model file: name, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    digest = hashlib.sha256(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{p.stem}-{digest}"


def counts_path(model_path: str | os.PathLike, prompts=CALIBRATION_PROMPTS) -> Path:
    """Keyed by the model file and the prompt set (a different set never reuses counts)."""
    key = hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:8]
    return cache_dir() / "calibration" / f"{model_file_key(model_path)}-p{key}-v{CALIBRATION_VERSION}.json"


def load_counts(model_path, prompts=CALIBRATION_PROMPTS) -> np.ndarray | None:
    path = counts_path(model_path, prompts)
    if not path.exists():
        return None
    try:
        return np.asarray(json.loads(path.read_text())["counts"], dtype=np.int64)
    except (ValueError, KeyError):  # a damaged cache file is recomputed
        return None


def save_counts(model_path, counts: np.ndarray, n_tokens: int, prompts=CALIBRATION_PROMPTS) -> Path:
    path = counts_path(model_path, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(model_path), "tokens": n_tokens,
                               "counts": np.asarray(counts).tolist()}))
    tmp.replace(path)
    return path


class CountingExperts:
    """ExpertBackend wrapper that counts routing per (layer, expert)."""

    def __init__(self, inner, n_layers: int, n_experts: int):
        self.inner = inner
        self.counts = np.zeros((n_layers, n_experts), dtype=np.int64)

    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        self.counts[layer] += np.bincount(expert_ids.cpu().numpy().ravel(), minlength=self.counts.shape[1])
        return self.inner.moe_forward(layer, hidden, expert_ids, gate_weights)


def calibrate(model, tokenize, prompts=CALIBRATION_PROMPTS, progress: bool = True) -> tuple[np.ndarray, int]:
    """Prefill each prompt through `model` (a runtime Model) counting its routing.
    tokenize: str -> list[int]. Returns (counts [L, E], tokens seen)."""
    import sys

    import torch
    from tqdm import tqdm

    a = model.args
    counter = CountingExperts(model.expert_backend, a.n_layers, a.n_experts)
    saved, model.expert_backend = model.expert_backend, counter
    n_tokens = 0
    try:
        for text in tqdm(prompts, desc="calibrating expert popularity", unit="prompt",
                         file=sys.stderr, disable=not progress):
            tokens = torch.tensor(tokenize(text), dtype=torch.long)
            cache = model.new_cache(len(tokens) + 1)
            with torch.inference_mode():
                model.forward(tokens, cache, 0, all_logits=False)
            n_tokens += len(tokens)
    finally:
        model.expert_backend = saved
    return counter.counts, n_tokens


def cached_counts(model, model_path, tokenize, progress: bool = True,
                  prompts=CALIBRATION_PROMPTS) -> np.ndarray:
    """Counts from the cache dir, or a calibration pass (then cached) on first use."""
    counts = load_counts(model_path, prompts)
    if counts is None or counts.shape != (model.args.n_layers, model.args.n_experts):
        counts, n = calibrate(model, tokenize, prompts, progress=progress)
        save_counts(model_path, counts, n, prompts)
    return counts
