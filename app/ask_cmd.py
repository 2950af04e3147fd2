"""`moechat ask "..."`: one prompt, the reply streamed to stdout (or one JSON object).

Top-level imports are standard library only: start-up before the model loads must stay
well under a quarter of a second, and this path never imports textual or torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "ask one question and stream the answer (reads extra context from stdin when piped)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moechat.app.arg_types import non_negative_float, positive_int
    from moechat.app.engine_flags import add_engine_arguments

    parser.add_argument("prompt", nargs="?", default="", help="the question (or read from stdin)")
    parser.add_argument("--model", "-m", help="GGUF path, catalogue NAME[:QUANT] or hub org/repo:file.gguf (default: the built-in demo MoE)")
    parser.add_argument("--system", "-s", help="system prompt")
    parser.add_argument("--max-tokens", type=positive_int, default=512, metavar="N")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                        help="0 (default) decodes greedily")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    thread = parser.add_mutually_exclusive_group()
    thread.add_argument("-c", "--continue", dest="continue_last", action="store_true",
                        help="continue the last conversation (a new one if there is none)")
    thread.add_argument("--cid", type=positive_int, metavar="ID",
                        help="continue the conversation with this id")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from moechat.backends.engines.engine import Sampling
    from moechat.backends.errors import MoechatError
    from moechat.backends.manager import open_engine, record_reply
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.model.model_resolve import resolve_model

    from moechat.app.engine_flags import engine_kwargs
    from moechat.app.history import History, ReplyWriter, chat_messages, reply_stats, title_from

    question = _read_question(args.prompt)
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    card = read_model_card(resolve_model(args.model))

    history = History()
    cid = _conversation_to_continue(history, args)
    if cid is None:
        cid = history.new_conversation(title_from(question), model=card.name,
                                       system_prompt=args.system or "")
    elif args.system:
        history.set_system_prompt(cid, args.system)
    history.set_current(cid)
    history.add_message(cid, "user", question)  # saved before the model even loads
    messages = chat_messages(history, cid)

    engine = open_engine(card, **engine_kwargs(args))
    writer = ReplyWriter(history, cid, model=card.name)
    token_ids, last = [], None
    try:
        for event in engine.generate(messages, sampling):
            writer.append(event.text)
            token_ids.extend(event.token_ids)
            if not args.json and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            last = event
    except KeyboardInterrupt:
        writer.finish("stopped")
        if not args.json:
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    except BaseException:
        writer.finish("error")
        raise
    finally:
        engine.close()
    if last is None or last.finish_reason == "error":
        writer.finish("error")
        raise MoechatError(last.error if last and last.error else "the engine produced nothing")
    writer.finish("done", stats=reply_stats(last, engine.name, len(token_ids)))
    record_reply(card, engine, last)  # measured beside predicted: corrects the next plans
    _hint_if_profile_stale()
    history.close()
    text = writer.parts
    if args.json:
        print(json.dumps({
            "text": "".join(text),
            "token_ids": token_ids,
            "prompt_tokens": last.prompt_tokens,
            "prefill_tok_s": round(last.prefill_tok_s, 2),
            "decode_tok_s": round(last.decode_tok_s, 2),
            "engine": engine.name,
            "placement": engine.placement,
            "model": card.path,
            "finish_reason": last.finish_reason,
            "rss_bytes": last.rss_bytes,
            "threads": last.stats.get("threads", getattr(engine, "threads", None)),
            "stats": dict(last.stats),
            "conversation_id": cid,
        }))
    else:
        sys.stdout.write("\n")
        if sys.stderr.isatty():
            sys.stderr.write(
                f"[{engine.name} · {engine.placement} · prompt {last.prompt_tokens} tok at "
                f"{last.prefill_tok_s:.1f} tok/s · decode {last.decode_tok_s:.1f} tok/s"
                f"{_threads_note(last)}]\n"
            )
    return 0


def _hint_if_profile_stale() -> None:
    """ask never re-measures (one-shot, scripted): it says once that the profile drifted."""
    from moechat.backends.plan.run_log import stale_profile_hint

    hint = stale_profile_hint()
    if hint:
        print(hint, file=sys.stderr)


def _threads_note(last) -> str:
    threads = last.stats.get("threads")
    return f" · {threads} thread{'s' if threads != 1 else ''}" if threads else ""


def _conversation_to_continue(history, args: argparse.Namespace) -> int | None:
    from moechat.backends.errors import MoechatError

    if args.cid is not None:
        if history.conversation(args.cid) is None:
            raise MoechatError(f"ask: no conversation with id {args.cid}")
        return args.cid
    if args.continue_last:
        return history.last_conversation_id()
    return None


def _read_question(prompt: str) -> str:
    from moechat.backends.errors import MoechatError

    piped = ""
    if sys.stdin is not None and not sys.stdin.isatty():
        raw = getattr(sys.stdin, "buffer", None)  # bytes, so that bad UTF-8 is ours to handle
        data = raw.read() if raw is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        piped = _utf8_or_replaced(data, "stdin")
    # argv is decoded with surrogateescape: bytes that are not UTF-8 arrive as lone surrogates
    prompt = _utf8_or_replaced(os.fsencode(prompt), "the prompt")
    question = "\n\n".join(part for part in (prompt.strip(), piped.strip()) if part)
    if not question:
        raise MoechatError('ask: no prompt (give one: moechat ask "..." or pipe text in)')
    return question


def _utf8_or_replaced(data: bytes, where: str) -> str:
    """Text as UTF-8; bytes that are not become U+FFFD, with one warning line on stderr."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        bad = sum(1 for ch in data.decode("utf-8", "replace") if ch == "\ufffd")
        print(f"moechat: warning: {where} is not valid UTF-8; {bad} undecodable byte sequence"
              f"{'s' if bad != 1 else ''} replaced with U+FFFD", file=sys.stderr)
        return data.decode("utf-8", "replace")
