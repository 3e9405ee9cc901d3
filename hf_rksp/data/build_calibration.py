#!/usr/bin/env python3
"""Rebuild hf_rksp/data/calibration.txt from public-domain novels shipped in Debian.

Not used at run time; kept so the file can be regenerated and audited.
Needs a Debian 12 (bookworm) machine with `apt-get update` done and R installed
(`apt-get install r-base-core`). The three source packages are fetched with
`apt-get download` (pinned versions, no installation needed) and unpacked into
a temporary directory; Rscript reads the R data files and dumps plain text.

    python hf_rksp/data/build_calibration.py [OUTPUT]   # default: calibration.txt next to this file

See SOURCES.md for the sources, their public-domain status and the steps below.
"""
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import unicodedata

DEBS = ["r-cran-janeaustenr=1.0.0-1", "r-cran-tokenizers=0.3.0-1", "r-cran-tidytext=0.4.1-1"]
LIB = "usr/lib/R/site-library"
# (file stem, R expression producing a character vector, target characters)
WORKS = [
    ("austen", 'invisible(lazyLoad("{r}/janeaustenr/data/Rdata", e)); x <- e$prideprejudice', 100_000),
    ("dickens", 'load("{r}/tidytext/extdata/books.rda", e); x <- e$books$text[e$books$gutenberg_id == 1400]', 100_000),
    ("melville", 'invisible(lazyLoad("{r}/tokenizers/data/Rdata", e)); x <- e$mobydick', 100_000),
    ("wells", 'load("{r}/tidytext/extdata/books.rda", e); x <- e$books$text[e$books$gutenberg_id == 36]', 100_000),
]
HEADING = re.compile(r"^(chapter|book)\b", re.I)


def paragraphs(raw):
    text = unicodedata.normalize("NFC", raw.replace("\ufeff", "").replace("\r\n", "\n"))
    if "*** START OF" in text:  # Project Gutenberg licence header/footer
        text = text.split("*** START OF", 1)[1].split("\n", 1)[1]
        text = re.split(r"\*\*\* ?END OF", text)[0]
    text = text[re.search(r"^chapter\b", text, re.I | re.M).start():]  # drop title page, ToC, notes
    chapters, cur = [], None
    for block in re.split(r"\n\s*\n", text):
        para = re.sub(r"\s+", " ", block).strip()
        para = re.sub(r"(?<!\w)_(\S(?:.*?\S)?)_(?!\w)", r"\1", para)  # _italics_ -> italics
        if not para or para.startswith("End of") and "Project Gutenberg" in para:
            continue
        if HEADING.match(para):
            cur = []
            chapters.append(cur)
        elif para.startswith('"') or para.upper() != para or not re.search("[A-Z]", para):
            cur.append(para)  # (unquoted ALL-CAPS paragraphs are chapter titles and are dropped)
    return chapters


def main(out):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *DEBS], cwd=tmp, check=True)
        for deb in sorted(f for f in os.listdir(tmp) if f.endswith(".deb")):
            subprocess.run(["dpkg-deb", "-x", deb, "root"], cwd=tmp, check=True)
        pieces = []
        for stem, expr, budget in WORKS:
            dump = os.path.join(tmp, stem + ".txt")
            code = "e <- new.env(); " + expr.format(r=os.path.join(tmp, "root", LIB))
            code += f'; writeLines(enc2utf8(x), "{dump}", useBytes = TRUE)'
            subprocess.run(["Rscript", "-e", code], check=True)
            with open(dump, encoding="utf-8") as f:
                chapters = paragraphs(f.read())
            taken, n = [], 0
            for ch in chapters:  # whole chapters from the start until the budget is reached
                if n >= budget:
                    break
                taken += ch
                n += sum(len(p) + 2 for p in ch)
            pieces.append((stem, "\n\n".join(taken) + "\n", len(taken)))
    data, offset = b"", 0
    for stem, text, npara in pieces:
        blob = text.encode("utf-8") + (b"\n" if stem != pieces[-1][0] else b"")
        print(f"{stem}: bytes [{offset}, {offset + len(blob)}) paragraphs={npara}")
        data += blob
        offset += len(blob)
    with open(out, "wb") as f:
        f.write(data)
    print(f"{out}: {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.txt"))
