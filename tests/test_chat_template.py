"""Chat templates from model files render in a sandbox."""

from __future__ import annotations

import pytest

from moechat.backends.engines.chat_template import render_chat
from moechat.backends.errors import MoechatError

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chatml_fallback():
    assert render_chat(None, MESSAGES) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_with_bos_and_generation_prompt():
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    assert render_chat(template, MESSAGES, bos_token="<s>") == "<s>[user]hi[assistant]"


@pytest.mark.parametrize(
    "evil",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = messages.append({'role': 'x'}) %}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_template_reaching_for_python_internals_fails_clearly(evil):
    with pytest.raises(MoechatError, match="unsafe|chat template"):
        render_chat(evil, MESSAGES)


def test_template_raise_exception_is_a_clear_error():
    with pytest.raises(MoechatError, match="only user and assistant"):
        render_chat("{{ raise_exception('only user and assistant roles') }}", MESSAGES)


def test_harmony_template_renders_in_the_sandbox():
    """gpt-oss's harmony format (a hand-written copy of what its GGUFs carry, equal to
    llama.cpp's models/templates/openai-gpt-oss-120b.jinja on these turns): the system
    preamble with today's date (strftime_now, a global Hugging Face's renderer provides),
    the system message as developer instructions, past assistant turns on the final channel."""
    import datetime
    from pathlib import Path

    template = (Path(__file__).parent / "fixtures" / "templates" / "harmony.jinja").read_text()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}]
    today = datetime.date.today().isoformat()
    assert render_chat(template, messages) == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        f"Knowledge cutoff: 2024-06\nCurrent date: {today}\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
        "<|start|>user<|message|>hi<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
        "<|start|>user<|message|>And now?<|end|>"
        "<|start|>assistant"
    )
    with pytest.raises(MoechatError, match="unexpected role tool"):
        render_chat(template, [{"role": "tool", "content": "x"}])


def test_a_template_is_compiled_once_and_rendered_fresh_each_time():
    """The compiled template is kept; what it renders is not (messages, the date)."""
    from moechat.backends.engines.chat_template import compiled

    compiled.cache_clear()
    template = "{% for m in messages %}<{{ m.role }}:{{ m.content }}>{% endfor %}"
    assert render_chat(template, MESSAGES) == "<user:hi>"
    assert render_chat(template, [{"role": "user", "content": "bye"}]) == "<user:bye>"
    info = compiled.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_a_template_that_does_not_compile_fails_every_time():
    for _ in range(2):
        with pytest.raises(MoechatError, match="chat template failed"):
            render_chat("{% if %}", MESSAGES)
