"""Build the bundled conversations (data/chat/) from the Python FAQ shipped in Debian's python3-doc.

    apt-get install python3-doc
    python scripts/make_chat_corpus.py       # writes data/chat/{train,validation}.jsonl

Every question of the Python 3.11 FAQ (a section heading ending in "?", in the reST sources under
/usr/share/doc/python3.11/html/_sources/faq/) becomes a conversation of two turns: the question is the user
turn, the text of its section (up to the next heading, reST markup reduced to plain text as
scripts/make_corpus.py does) the assistant turn. Real, human-written questions and answers under the PSF
License, which already covers the bundled text corpus (data/corpus/LICENSE-python-docs.txt).

Rows are JSON lines: `messages` ([{role, content}], as HF chat datasets have them), `url` (a stable
pseudo-URL, `debian:python3-doc/faq/<page>#<question>`) and `timestamp` (the date of the package's newest
changelog entry). The validation split is chosen by a hash of the URL. The output depends only on the
installed package version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_corpus import (  # noqa: E402  (the sibling script: one reST reduction for both corpora)
    _ROLE,
    _UNDERLINE,
    DOC,
    PYDOC_SOURCES,
    CorpusSourceError,
    _rst_to_text,
    _slug,
    is_validation,
    package_timestamp,
)

MIN_ANSWER_CHARS = 40
"""Sections shorter than this (a bare pointer to another section) are left out."""


def _heading(lines: list[str], i: int) -> bool:
    """Line i is a section title: text followed by an underline (not itself an underline)."""
    return (i + 1 < len(lines) and bool(lines[i].strip()) and not _UNDERLINE.match(lines[i])
            and bool(_UNDERLINE.match(lines[i + 1])) and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip()))


def faq_conversations() -> Iterator[dict]:
    """One conversation per FAQ question, in page and source order."""
    faq = PYDOC_SOURCES / "faq"
    if not faq.exists():
        raise CorpusSourceError("the Python documentation sources are missing: apt-get install python3-doc")
    ts = package_timestamp("python3-doc")
    seen: set[str] = set()
    for path in sorted(faq.glob("*.rst.txt")):
        if path.name == "index.rst.txt":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        heads = [i for i in range(len(lines)) if _heading(lines, i)]
        page = path.name.removesuffix(".rst.txt")
        for a, b in zip(heads, heads[1:] + [len(lines)], strict=True):
            question = " ".join(_ROLE.sub(r"\1", lines[a]).replace("``", "").split())
            if not question.endswith("?"):
                continue  # a chapter title, not a question
            answer = _rst_to_text(lines[a + 2 : b])
            if len(answer) < MIN_ANSWER_CHARS:
                continue
            url = f"debian:python3-doc/faq/{page}#{_slug(question)}"
            while url in seen:  # "... in C?" and "... in C++?" share a slug
                url += "-"
            seen.add(url)
            yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                   "url": url, "timestamp": ts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "data/chat"),
                    help="directory to write train.jsonl and validation.jsonl into")
    ap.add_argument("--validation-fraction", type=float, default=0.15, help="share of conversations held out")
    args = ap.parse_args(argv)
    try:
        rows = list(faq_conversations())
    except CorpusSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    valid = [r for r in rows if is_validation(r["url"], args.validation_fraction)]
    train = [r for r in rows if not is_validation(r["url"], args.validation_fraction)]
    for name, part in (("train", train), ("validation", valid)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        size = sum(len(m["content"].encode()) for r in part for m in r["messages"])
        print(f"{name}.jsonl: {len(part)} conversations, {size / 1e3:.0f} kB of text")
    shutil.copyfile(DOC / "python3-doc/copyright", out / "LICENSE-python-docs.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
