"""How a conversation becomes text: InstructRetro's prompt templates, the passages of a context, and
the pieces of an example (what the model reads and what it learns to answer). Instruction tuning
formats its rows with them, evaluation asks its questions with them and serving renders its
chats with them, so all three see the same text.

- ``format_passage``: a passage as InstructRetro writes it, ``title: {t}, source: {text}``.
- ``TEMPLATES``: the reference's (``tools/retro/sft/dataset_conv.py``): ``retro``, its QA prompt
  (``reformat_prompt``), and ``retro_sft``, its Retro-tuning prompt (``reformat_prompt_retro``);
  ``chat`` is the tokenizer's own chat template.
- ``pieces``: an ``Example`` as (text, is-target) pieces; ``qa_prompt`` and ``chat_prompt``:
  everything before the answer; ``fit_passages``: as many passages as fit the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from retro_ray.database.corpus import BadInputError


def format_passage(text: str | None, title: str | None = None) -> str:
    """A passage as InstructRetro writes it, in prompts and as the encoder's neighbours:
    ``title: {title}, source: {text}``, each on one line."""
    return f"title: {' '.join((title or '').split())}, source: {' '.join((text or '').split())}"


SYSTEM = ("System: This is a chat between a user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions based on the context. The assistant "
          "should also indicate when the answer cannot be found in the context.")
SYSTEM_SFT = ("System: This is a chat between a user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
ANSWER_PREFIX = " The answer is"


@dataclass(frozen=True)
class Template:
    """The reference's text templates (``tools/retro/sft/dataset_conv.py``): a system line, and
    how a short-answer question is put to the assistant."""

    system: str
    question: str  # formats {question}


TEMPLATES = {
    "retro": Template(SYSTEM, "Answer the following question with a short span. {question}"),  # reformat_prompt
    "retro_sft": Template(SYSTEM_SFT, "{question} Answer the above question with a short phrase."),  # ..._retro
}


@dataclass
class Example:
    """One conversation: ``messages`` ({role, content}; the last is the assistant's), the
    ``passages`` of its context, and whether it is a QA row (short answer after "The answer is")."""

    messages: list[dict]
    passages: list[str] = field(default_factory=list)
    question: str | None = None
    """A QA row's question (what its context is retrieved for)."""
    has_context: bool = False


def pieces(example: Example, template: str = "retro", tokenizer=None, targets: str = "final") -> list[tuple[str, bool]]:
    """The example as (text, is_target) pieces; the text of the final answer is the target (with
    ``targets: all``, of every answer). With a ``retro`` template the end of text is added by
    ``encode``; the chat template's own end-of-turn text is part of the answer piece."""
    messages = example.messages
    if template == "chat":
        return _chat_pieces(example, tokenizer, targets)
    form = TEMPLATES[template]
    out: list[tuple[str, bool]] = [(_retro_head(example, form), False)]
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "assistant":
            answer_prefix = ANSWER_PREFIX if example.question is not None else ""
            out.append(("Assistant:" + answer_prefix, False))
            out.append((" " + m["content"], last or targets == "all"))
            if not last:
                out.append(("\n\n", False))
        elif m["role"] == "user":
            content = form.question.format(question=m["content"]) if example.question is not None else m["content"]
            out.append((f"User: {content}\n\n", False))
    return _merge(out)


def _retro_head(example: Example, form: Template) -> str:
    """System line and context passages, each followed by a blank line."""
    system = next((f"System: {m['content']}" for m in example.messages if m["role"] == "system"), form.system)
    return system + "\n\n" + "".join(p + "\n\n" for p in example.passages)


def qa_prompt(question: str, passages: list[str], template: str = "retro", tokenizer=None) -> str:
    """The evaluation prompt: everything before the answer, for a question and its passages."""
    example = Example([{"role": "user", "content": question}, {"role": "assistant", "content": "x"}],
                      passages, question=question)
    return _before_answer(example, template, tokenizer)


def chat_prompt(messages: list[dict], passages: list[str], template: str = "retro", tokenizer=None) -> str:
    """A chat request's prompt: its messages ({role, content}, the last a user's) and passages,
    in the training template, up to where the assistant's answer begins."""
    example = Example([*messages, {"role": "assistant", "content": "x"}], passages)
    return _before_answer(example, template, tokenizer)


def _before_answer(example: Example, template: str, tokenizer) -> str:
    return "".join(text for text, _ in pieces(example, template, tokenizer)[:-1])


def fit_passages(build: Callable[[list[str]], str], passages: list[str], tokenizer,
                 room: int) -> tuple[str, int, int]:
    """``build(passages)`` with as many of the best-ranked passages as keep the prompt within
    ``room`` tokens -> (prompt, passages used, its tokens); the lowest-ranked go first."""
    given = list(passages)
    while True:
        prompt = build(given)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not given or n <= room:
            return prompt, len(given), n
        given.pop()


def _chat_pieces(example: Example, tokenizer, targets: str) -> list[tuple[str, bool]]:
    """Pieces from the tokenizer's chat template: the context goes into the first user turn, the
    system line is the template's system message; each assistant turn's rendered text is the target."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadInputError("instruct.template: chat, but the run's tokenizer has no chat template; "
                            "use template: retro")
    system = next((m["content"] for m in example.messages if m["role"] == "system"),
                  SYSTEM.removeprefix("System: "))
    messages = [{"role": "system", "content": system}]
    context = "".join(p + "\n\n" for p in example.passages)
    for m in example.messages:
        if m["role"] == "user":
            content = (TEMPLATES["retro"].question.format(question=m["content"]) if example.question is not None
                       else m["content"])
            messages.append({"role": "user", "content": context + content})
            context = ""
        elif m["role"] == "assistant":
            messages.append(m)

    def render(msgs: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise BadInputError("the tokenizer's chat template does not render a conversation as a prefix of "
                                "its continuation; use instruct.template: retro")
        out += [(before[len(done):], False), (through[len(before):], i == len(messages) - 1 or targets == "all")]
        done = through
    return _merge(out)


def _merge(parts: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Adjacent pieces of the same kind as one (fewer tokenisation boundaries)."""
    merged: list[tuple[str, bool]] = []
    for text, target in parts:
        if merged and merged[-1][1] == target:
            merged[-1] = (merged[-1][0] + text, target)
        elif text:
            merged.append((text, target))
    return merged
