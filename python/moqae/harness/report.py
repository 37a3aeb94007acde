"""Markdown reports made of sections that different commands own (docs/PERFORMANCE.md)."""
import os
import re


def write_section(path, title, heading, text, append=False):
    """Writes `text` as the section `## heading` of the report at `path` (titled `# title` when new):
    it replaces that section, or with `append` adds to its end, and keeps every other section."""
    sections = {}   # heading → body, in file order
    if os.path.exists(path):
        with open(path) as f:
            for part in re.split(r"^## ", f.read(), flags=re.MULTILINE)[1:]:
                name, _, body = part.partition("\n")
                sections[name.strip()] = body.strip("\n") + "\n"
    sections[heading] = (sections.get(heading, "") + "\n" if append and heading in sections else "") + text.strip("\n") + "\n"
    with open(path, "w") as f:
        f.write(f"# {title}\n\n" + "\n".join(f"## {name}\n\n{body}" for name, body in sections.items()))
