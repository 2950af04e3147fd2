"""Chat prompt -> token ids, and token ids -> text, by llama.cpp's own tokenizer.

Shared by every engine: the llama.cpp engine passes its loaded `Llama`; the torch runtime
opens the same GGUF with `vocab_only=True` (the vocabulary alone, no weights), so token ids
are identical to the reference by construction.
"""

from __future__ import annotations

import codecs

from moechat.backends.engines.chat_template import render_chat
from moechat.backends.engines.engine import Message


class ChatTokenizer:
    def __init__(self, llm):
        """`llm`: a llama_cpp.Llama (full or vocab_only)."""
        self.llm = llm
        self.template = llm.metadata.get("tokenizer.chat_template")
        self.bos_text = self.token_text(llm.token_bos())
        self.eos_text = self.token_text(llm.token_eos())

    @classmethod
    def open(cls, path: str) -> "ChatTokenizer":
        import llama_cpp

        from moechat.kernels.ggml import quiet_ggml_log

        # vocab_only still builds a context, and llama.cpp logs a spurious complaint about its
        # size (training context 0): route llama.cpp's log to nowhere meanwhile.
        with quiet_ggml_log():
            return cls(llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        prompt = render_chat(self.template, list(messages), self.bos_text, self.eos_text)
        starts_with_bos = bool(self.bos_text) and prompt.startswith(self.bos_text)
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=not starts_with_bos, special=True)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def is_end(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def text_stream(self) -> "TextStream":
        return TextStream(self.llm)

    def close(self) -> None:
        self.llm.close()




class TextStream:
    """Generated token ids in, text out, one token at a time: a multi-byte UTF-8 character
    split across tokens comes out whole, with the token that completes it."""

    def __init__(self, llm):
        self._llm = llm
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._llm.detokenize([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
