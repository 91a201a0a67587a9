#!/usr/bin/env python3
"""Turns the code examples in a public header's comments into C++ to compile.

A header's example is a run of comment lines indented by at least three
spaces after the `//` (the style of the headers in include/dtrain/). Each run
becomes the body of a function in namespace
dtrain_doc_examples::<stem>_<n> (n counts the runs from 1), after an #include
of CONTEXT, a header that declares, in the same namespaces, what the
examples take from their surroundings (a grid, a step count, ...). A line
that is only `...` stands for the reader's own code and becomes a comment.
#line directives point compiler errors at the header's own lines.

Usage: header_examples.py HEADER CONTEXT OUT [SOURCE_ROOT]
"""

import os
import re
import sys

EXAMPLE_LINE = re.compile(r"^//   (.*)$")


def example_blocks(lines):
    """[(first line number, [code lines])] of the header's examples."""
    blocks = []
    current = None
    for number, line in enumerate(lines, start=1):
        match = EXAMPLE_LINE.match(line.rstrip("\n"))
        if match:
            if current is None:
                current = (number, [])
                blocks.append(current)
            current[1].append(match.group(1))
        else:
            current = None
    return blocks


def main(argv):
    if len(argv) not in (4, 5):
        sys.exit(__doc__)
    header, context, out = argv[1:4]
    root = argv[4] if len(argv) == 5 else os.getcwd()
    with open(header, encoding="utf-8") as f:
        blocks = example_blocks(f.readlines())
    if not blocks:
        sys.exit(f"{header}: no example (comment lines indented by three spaces) found")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(header))[0])
    shown = os.path.relpath(header, root)
    text = [f"// Generated from {shown} by tests/docs/header_examples.py; do not edit.",
            f'#include "{context}"', ""]
    for index, (first, code) in enumerate(blocks, start=1):
        text.append(f"namespace dtrain_doc_examples::{stem}_{index} {{")
        text.append("void example();")
        text.append("void example() {")
        text.append(f'#line {first} "{shown}"')
        for line in code:
            text.append("// ..." if line.strip() == "..." else line)
        text.append("}")
        text.append(f"}}  // namespace dtrain_doc_examples::{stem}_{index}")
        text.append("")
    content = "\n".join(text)
    # Rewrite only on change, so that an unchanged header rebuilds nothing.
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            if f.read() == content:
                return
    with open(out, "w", encoding="utf-8") as f:
        f.write(content)


if __name__ == "__main__":
    main(sys.argv)
