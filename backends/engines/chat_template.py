"""Render a GGUF's chat template (Jinja) in a sandbox.

Templates come from model files downloaded off the internet, so they run in Jinja's
ImmutableSandboxedEnvironment: a template that reaches for Python internals
(`__class__`, `__globals__`, mutating methods...) fails with a one-line MoechatError.
The globals are those Hugging Face's renderer gives templates: `raise_exception` and
`strftime_now` (gpt-oss's harmony template writes the current date into its system turn).
A template is compiled once and kept (`compiled`): compiling is most of a render's cost
(about 5 ms for a 1.5 KB template, on every turn of a chat or request of the server).
"""

from __future__ import annotations

import functools

from moechat.backends.errors import MoechatError

# Used when a GGUF carries no template: ChatML, which most instruct models understand.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat(
    template: str | None,
    messages: list[dict],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    import jinja2
    from jinja2.sandbox import SecurityError

    try:
        return compiled(template or CHATML_TEMPLATE).render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except SecurityError as err:
        raise MoechatError(f"chat template refused: it tries an unsafe operation ({err})") from err
    except jinja2.TemplateError as err:
        raise MoechatError(f"chat template failed: {err}") from err


@functools.lru_cache(maxsize=16)
def compiled(template: str):
    """The template compiled in the sandbox, once per distinct text (a template that does not
    compile raises each time: lru_cache keeps no exceptions)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(str(fmt))
