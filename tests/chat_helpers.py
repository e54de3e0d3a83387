"""Conversations and templates for the chat tests (tests/common/test_chat.py, precompute, training).

    convs = sample_conversations(40, seed=0)
    path = write_chat_corpus(tmp / "chat.jsonl", convs)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.helpers import sample_texts

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
"""A template of our own (not SmolLM2's): `### role:` headers, replies closed by the EOS token."""
GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
)
"""PLAIN_TEMPLATE with the replies in `{% generation %}` blocks (transformers' assistant mask)."""


def sample_conversations(n: int, seed: int = 0, *, max_words: int = 30) -> list[list[dict[str, str]]]:
    """`n` deterministic conversations: an optional system turn, then one or two user/assistant exchanges."""
    rng = random.Random(seed)
    texts = sample_texts(4 * n, seed=seed, min_words=3, max_words=max_words)
    convs = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
        for j in range(rng.randint(1, 2)):
            msgs.append({"role": "user", "content": texts[4 * i + 2 * j]})
            msgs.append({"role": "assistant", "content": texts[4 * i + 2 * j + 1]})
        convs.append(msgs)
    return convs


def write_chat_corpus(path: str | Path, convs: list, *, field: str = "messages") -> Path:
    """One JSON object per line, `{field: messages, "id": i}` (rows may be malformed on purpose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: c, "id": i}) + "\n" for i, c in enumerate(convs)), encoding="utf-8")
    return path
