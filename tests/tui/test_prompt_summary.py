"""The footer's and status bar's prompt figures: evaluated vs restored from a saved state."""

from moechat.app.tui.message_item import reply_footer
from moechat.app.tui.status_bar import prompt_summary


def test_prompt_figures():
    stats = {"prompt_tokens_evaluated": 18, "prompt_tokens_reused": 1159, "prompt_tokens_restored": 1159}
    assert prompt_summary(stats) == "prompt 18 evaluated · 1159 restored"
    kept = {"prompt_tokens_evaluated": 9, "prompt_tokens_reused": 70, "prompt_tokens_restored": 0}
    assert prompt_summary(kept) == "prompt 9 evaluated · 70 kept"
    assert prompt_summary({"engine": "torch"}) == ""
    assert reply_footer({"tokens": 8, "engine": "llama.cpp", **stats}).endswith("llama.cpp · prompt 18 evaluated · 1159 restored")
