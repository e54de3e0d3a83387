"""Build the bundled English corpus (data/corpus/) from texts shipped in Debian packages.

    apt-get install bible-kjv bible-kjv-text jargon-text python3-doc
    python scripts/make_corpus.py            # writes data/corpus/{train,validation}.jsonl

Three domains, each real human-written text under a licence that allows bundling:

- scripture: the King James Bible (public domain), one document per chapter, read with the `bible` program
  of the `bible-kjv` package from the `bible-kjv-text` data;
- jargon: the Jargon File 4.4.7 (public domain), consecutive glossary entries grouped into documents;
- python: the Python 3.11 tutorial, HOWTOs and FAQ (PSF License), one document per section, reST markup
  reduced to plain text.

Rows are C4-style JSON lines: `text`, `url` (a stable pseudo-URL naming the source, e.g.
`debian:bible-kjv-text/Genesis/1`) and `timestamp` (the date of the Debian package's changelog entry).
The output depends only on the installed package versions: documents are chosen by even strides, the
validation split by a hash of the URL, and the domains are interleaved round-robin so that any prefix of
train.jsonl (e.g. `--max-tokens`) covers all three.
"""

from __future__ import annotations

import argparse
import email.utils
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOC = Path("/usr/share/doc")
PYDOC_SOURCES = DOC / "python3.11/html/_sources"
DOMAINS = ("scripture", "jargon", "python")


class CorpusSourceError(RuntimeError):
    """A Debian package or program the corpus is built from is missing."""


@dataclass(frozen=True)
class Document:
    domain: str
    url: str
    text: str
    timestamp: str

    def row(self) -> dict[str, str]:
        return {"text": self.text, "url": self.url, "timestamp": self.timestamp}


def package_timestamp(package: str) -> str:
    """ISO date of the newest entry of the package's Debian changelog (stable for a package version)."""
    for name in ("changelog.Debian.gz", "changelog.gz"):
        path = DOC / package / name
        if path.exists():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" -- "):
                        date = line.split(">", 1)[1].strip()
                        return email.utils.parsedate_to_datetime(date).strftime("%Y-%m-%dT%H:%M:%SZ")
    raise CorpusSourceError(f"no changelog for package {package}: apt-get install {package}")


def _paragraphs(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs separated by blank lines."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


# ---- scripture -----------------------------------------------------------------------------------
def kjv_documents() -> Iterator[Document]:
    """One document per chapter of the King James Bible."""
    if shutil.which("bible") is None:
        raise CorpusSourceError("the `bible` program is missing: apt-get install bible-kjv bible-kjv-text")
    ts = package_timestamp("bible-kjv-text")
    out = subprocess.run(["bible", "-l0", "Ge1:1-Re22:21"], check=True, capture_output=True, text=True).stdout
    heading, verses = None, []
    for line in out.splitlines() + ["END 0"]:
        if not line.strip():
            continue
        if not line.startswith(" "):  # "Genesis 1", "1 Samuel 3": a new chapter
            if heading is not None:
                book, chapter = heading.rsplit(" ", 1)
                yield Document(
                    "scripture",
                    f"debian:bible-kjv-text/{book.replace(' ', '_')}/{chapter}",
                    "\n".join(verses),
                    ts,
                )
            heading, verses = line.strip(), []
        else:
            verses.append(line.strip().split(" ", 1)[1])  # drop the verse number


# ---- jargon --------------------------------------------------------------------------------------
_ENTRY = re.compile(r"^   :(.+?):(.*)$")
_LETTER = re.compile(r"^  \S{1,2}$")  # "  A": the per-letter index that separates glossary sections


def jargon_documents(group_chars: int = 1500) -> Iterator[Document]:
    """Glossary entries of the Jargon File, consecutive entries grouped into ~group_chars documents."""
    path = DOC / "jargon-text/jargon.txt.gz"
    if not path.exists():
        raise CorpusSourceError("the Jargon File is missing: apt-get install jargon-text")
    ts = package_timestamp("jargon-text")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().replace("\u00a0", " ").splitlines()  # no-break spaces in headings
    start = lines.index("Glossary", 100)  # the second "Glossary" line opens the glossary itself
    end = next(i for i, line in enumerate(lines) if line.startswith("Appendix A."))
    entries: list[tuple[str, str]] = []
    head, body = None, []
    for line in lines[start:end]:
        m = _ENTRY.match(line)
        if m or _LETTER.match(line):
            if head is not None:
                entries.append((head, _paragraphs(body)))
            head, body = (m.group(1), [m.group(2)]) if m else (None, [])
        elif head is not None:
            body.append(line)
    if head is not None:
        entries.append((head, _paragraphs(body)))
    group: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        group.append(entry)
        if sum(len(h) + len(b) for h, b in group) >= group_chars or i == len(entries) - 1:
            text = "\n\n".join(f"{h}: {b}" for h, b in group).replace("{", "").replace("}", "")
            yield Document("jargon", f"debian:jargon-text/{_slug(group[0][0])}", text, ts)
            group = []


# ---- python docs ---------------------------------------------------------------------------------
_ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)\s*(?:<[^>]*>)?`")
_UNDERLINE = re.compile(r"^([=\-~^*\"'+#`.])\1{3,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\. ")


def _rst_to_text(lines: list[str]) -> str:
    """Plain text from reST: roles to their text, no directives/labels/comments, literal blocks kept."""
    out: list[str] = []
    skip_indent: int | None = None
    for line in lines:
        if skip_indent is not None:
            if not line.strip() or len(line) - len(line.lstrip()) > skip_indent:
                continue
            skip_indent = None
        m = _DIRECTIVE.match(line)
        if m:
            rest = line[m.end() :]
            if rest.startswith(("code-block::", "code::", "doctest::")):
                out.append("")  # keep the code that follows, drop the directive line
                continue
            if rest.startswith(("note::", "seealso::", "tip::", "warning::", "important::")):
                out.append(rest.split("::", 1)[1].strip())
                continue
            skip_indent = len(m.group(1))  # labels, index entries, comments, other directives
            continue
        if _UNDERLINE.match(line):
            continue
        line = _ROLE.sub(r"\1", line).replace("``", "").replace("**", "")
        out.append(line[:-1] if line.endswith("::") else line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(s.rstrip() for s in out)).strip()
    return text


def python_doc_documents() -> Iterator[Document]:
    """Sections (split at the second heading level) of the Python tutorial, HOWTOs and FAQ."""
    if not PYDOC_SOURCES.exists():
        raise CorpusSourceError("the Python documentation sources are missing: apt-get install python3-doc")
    ts = package_timestamp("python3-doc")
    for part in ("tutorial", "howto", "faq"):
        for path in sorted((PYDOC_SOURCES / part).glob("*.rst.txt")):
            if path.name == "index.rst.txt":
                continue
            lines = path.read_text(encoding="utf-8").splitlines()
            # a section starts at a title line followed by an underline of '=' (tutorial, howto) or '-'
            marks = {
                lines[i + 1][0]
                for i in range(len(lines) - 1)
                if lines[i].strip() and _UNDERLINE.match(lines[i + 1]) and not _UNDERLINE.match(lines[i])
            }
            level = "=" if "=" in marks else "-"
            starts = [0] + [
                i
                for i in range(1, len(lines) - 1)
                if lines[i].strip()
                and not _UNDERLINE.match(lines[i])
                and _UNDERLINE.match(lines[i + 1])
                and lines[i + 1][0] == level
            ]
            page = path.name.removesuffix(".rst.txt")
            for a, b in zip(starts, starts[1:] + [len(lines)], strict=True):
                text = _rst_to_text(lines[a:b])
                if len(text) < 200:  # a bare title or label between sections
                    continue
                anchor = _slug(_ROLE.sub(r"\1", lines[a]).strip()) if a else ""
                url = f"debian:python3-doc/{part}/{page}" + (f"#{anchor}" if anchor else "")
                yield Document("python", url, text, ts)


# ---- selection and split -------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[:80] or "x"


def select(docs: list[Document], budget_bytes: int) -> list[Document]:
    """Evenly spaced documents (in source order) adding up to about budget_bytes of UTF-8 text."""
    total = sum(len(d.text.encode()) for d in docs)
    if total <= budget_bytes:
        return docs
    stride = total / budget_bytes
    return [d for i, d in enumerate(docs) if int(i / stride) != int((i - 1) / stride) or i == 0]


def is_validation(url: str, fraction: float) -> bool:
    return int(hashlib.sha256(url.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def interleave(groups: list[list[Document]]) -> list[Document]:
    """Round-robin over the domains, in proportion to their sizes, so every prefix mixes all of them."""
    out, pos = [], [0] * len(groups)
    while any(p < len(g) for p, g in zip(pos, groups, strict=True)):
        # take next from the domain that is furthest behind its share
        i = min((p / len(g), j) for j, (p, g) in enumerate(zip(pos, groups, strict=True)) if p < len(g))[1]
        out.append(groups[i][pos[i]])
        pos[i] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent.parent / "data/corpus"),
        help="directory to write train.jsonl and validation.jsonl into",
    )
    ap.add_argument("--bytes-per-domain", type=int, default=500_000, help="approximate text size per domain")
    ap.add_argument("--validation-fraction", type=float, default=0.06, help="share of documents held out")
    args = ap.parse_args(argv)
    try:
        sources = {
            "scripture": list(kjv_documents()),
            "jargon": list(jargon_documents()),
            "python": list(python_doc_documents()),
        }
    except CorpusSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = [], []
    for domain in DOMAINS:
        chosen = select(sources[domain], args.bytes_per_domain)
        train.append([d for d in chosen if not is_validation(d.url, args.validation_fraction)])
        valid.append([d for d in chosen if is_validation(d.url, args.validation_fraction)])
        urls = [d.url for d in chosen]
        assert len(set(urls)) == len(urls), f"duplicate urls in {domain}"
    for name, groups in (("train", train), ("validation", valid)):
        rows = interleave(groups)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in rows:
                f.write(json.dumps(d.row(), ensure_ascii=False) + "\n")
        sizes = {
            dom: (len(g), sum(len(d.text.encode()) for d in g))
            for dom, g in zip(DOMAINS, groups, strict=True)
        }
        print(
            f"{name}.jsonl: " + ", ".join(f"{dom} {n} docs {b / 1e3:.0f} kB" for dom, (n, b) in sizes.items())
        )
    shutil.copyfile(DOC / "python3-doc/copyright", out / "LICENSE-python-docs.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
