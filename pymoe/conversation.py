"""A multi-turn conversation with a model: history, the chat template, and
keeping the prompt inside the context window."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .model import Message, Model


class Conversation:
    """Keeps the messages of a chat and answers new user turns.

    When the formatted conversation plus room for the answer no longer fits
    the context, the oldest user/assistant turns are dropped (a system
    message stays); the KV cache reuses whatever prefix is unchanged."""

    def __init__(self, model: Model, *, system: str | None = None, max_tokens: int = 512, **sampling: Any) -> None:
        self.model = model
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.messages: list[Message] = []
        self.dropped_turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.dropped_turns = 0
        self.model.reset()

    def _prompt_tokens(self, messages: list[Message]) -> int:
        return len(self.model.chat_tokens(messages))

    def _fit(self, messages: list[Message]) -> list[Message]:
        budget = self.model.n_ctx - min(self.max_tokens, self.model.n_ctx // 2)
        head = [m for m in messages[:1] if m["role"] == "system"]
        body = messages[len(head) :]
        while self._prompt_tokens(head + body) > budget:
            if len(body) <= 1:
                raise ValueError(
                    f"the message is too long for the context of {self.model.n_ctx} tokens; "
                    "hint: shorten it or start pymoe with a larger --ctx-size"
                )
            # drop the oldest turn: a user message and the answer after it
            cut = 2 if len(body) > 2 and body[1]["role"] == "assistant" else 1
            body = body[cut:]
            self.dropped_turns += 1
        return head + body

    def send(self, text: str) -> Iterator[str]:
        """Adds a user turn and streams the answer; the answer (or the part of
        it produced before the caller stopped iterating) joins the history.
        Stopped before any of the answer (Ctrl-C while the prompt is evaluated,
        an error), the conversation stays as it was: the message is not kept,
        and the KV cache holds no more than before."""
        dropped = self.dropped_turns
        messages = self._fit([*self.messages, {"role": "user", "content": text}])
        answer: list[str] = []
        finished = False
        try:
            for piece in self.model.chat_stream(messages, self.max_tokens, **self.sampling):
                answer.append(piece)
                yield piece
            finished = True
        finally:
            if finished or answer:
                self.messages = [*messages, {"role": "assistant", "content": "".join(answer)}]
            else:
                self.dropped_turns = dropped
