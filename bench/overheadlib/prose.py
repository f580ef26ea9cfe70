"""The report's prose, read from report-prose.md: one string.Template per `<!-- name -->`
block, so the wording is edited as text and report.py only computes the values."""

import os
import re
import string

PROSE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report-prose.md")


def load(path=PROSE_FILE):
    """The blocks of `path` by name; text before the first named block is a comment."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parts = re.split(r"^<!-- (\w+) -->\n", text, flags=re.M)
    return {name: string.Template(body.strip("\n")) for name, body in zip(parts[1::2], parts[2::2])}


PROSE = load()
