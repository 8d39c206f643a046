"""docs/protocol.md and fabric/protocol.py cannot drift apart: every command has a section
(``#### NAME (number)``), every command the doc names exists with that number, and the
command frames it writes (``FB 02 xx``) carry this version and the section's own numbers, and
every status code has its row, naming the exception a driver raises for it. No cluster."""
import os
import re

from fabric import protocol as P

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "protocol.md")
HEADING = re.compile(r"^#### (.+)$", re.M)
NAMED = re.compile(r"\b([A-Z][A-Z_]+) \((\d+)\)")


def _doc():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def _sections(text):
    """(heading, body) of each ``####`` section."""
    marks = list(HEADING.finditer(text))
    for m, nxt in zip(marks, marks[1:] + [None]):
        end = nxt.start() if nxt else len(text)
        yield m.group(1), text[m.end():end]


def test_every_command_has_a_section():
    named = {name for h, _ in _sections(_doc()) for name, _ in NAMED.findall(h)}
    missing = sorted(n for n in P.NAMES.values() if n not in named)
    assert not missing, f"commands of fabric/protocol.py without a '#### NAME (n)' section in docs/protocol.md: {missing}"


def test_every_section_names_a_command_with_its_number():
    wrong = []
    for h, _ in _sections(_doc()):
        pairs = NAMED.findall(h)
        assert pairs, f"a message section heading names no command: {h!r}"
        for name, num in pairs:
            if getattr(P, name, None) != int(num) or name not in P.NAMES.values():
                wrong.append(f"{name} ({num})")
    assert not wrong, f"docs/protocol.md has sections for commands fabric/protocol.py does not define so: {wrong}"


def test_command_numbers_named_in_the_doc_exist():
    """``NAME number`` and ``NAME (number)`` anywhere in the doc, for a command's name, say its number."""
    text = _doc()
    bad = sorted({f"{n} {v}" for n, v in re.findall(r"\b([A-Z][A-Z_]+) \(?(\d+)\)?", text)
                  if n in P.NAMES.values() and getattr(P, n) != int(v)})
    assert not bad, f"docs/protocol.md gives commands numbers they do not have: {bad}"
    # the table of commands by direction lists every command, and nothing else, with its number
    rows = [l for l in text.splitlines() if re.match(r"\| \d+(–\d+)? \| .*→", l)]
    listed = {}
    for row in rows:
        for n, v in re.findall(r"\b([A-Z][A-Z_]+) (\d+)\b", row.split("|")[3]):
            listed[n] = int(v)
    assert listed == {n: c for c, n in P.NAMES.items()}, (
        "the command table of docs/protocol.md §3 differs from fabric/protocol.py: "
        f"{sorted(set(listed.items()) ^ {(n, c) for c, n in P.NAMES.items()})}")


def test_command_frames_in_each_section_are_its_own():
    version = f"{P.VERSION:02x}"
    for h, body in _sections(_doc()):
        own = {f"{int(num):02x}" for _, num in NAMED.findall(h)}
        for ver, code in re.findall(r"`FB ([0-9a-fA-F]{2}) ([0-9a-fA-F]{2})", body):
            assert ver.lower() == version, f"{h}: a command frame of version {ver}, not {version}"
            assert code.lower() in own, f"{h}: a command frame with command 0x{code}, not this section's"


def test_sections_follow_the_command_numbers_in_each_direction():
    text = _doc()
    for m in re.finditer(r"^### (5\.[1-6] .+)$", text, re.M):
        rest = text[m.end():]
        nxt = re.search(r"^##?#? ", rest, re.M)
        part = rest[:nxt.start()] if nxt else rest
        nums = [int(NAMED.search(h).group(2)) for h in HEADING.findall(part)]
        assert nums == sorted(nums), f"docs/protocol.md {m.group(1)}: sections not in command order: {nums}"


def test_status_codes_and_header_sizes():
    from fabric.client import _ERRORS  # the exception a driver raises for each failed status

    text = _doc()
    rows = re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|(.*)$", text, re.M)
    assert rows, "docs/protocol.md §4.4 lists no status codes"
    wrong = [f"{name} {code}" for code, name, _ in rows if getattr(P, name, None) != int(code)]
    assert not wrong, f"status codes in docs/protocol.md that fabric/protocol.py does not have: {wrong}"
    listed = {int(code): rest for code, _, rest in rows}
    missing = sorted({P.OK, P.USER_ERROR, *_ERRORS} - set(listed))
    assert not missing, f"status codes without a row in docs/protocol.md §4.4: {missing}"
    raised = [f"{c}: {e.__name__}" for c, e in _ERRORS.items() if f"`{e.__name__}`" not in listed[c]]
    assert not raised, f"docs/protocol.md §4.4 names another exception than the driver raises for: {raised}"
    assert f"(FBP/{P.VERSION})" in text.splitlines()[0]
    said = set(re.findall(r'"version": ?(\d+)', text))  # WELCOME's JSON
    assert said == {str(P.VERSION)}, f"docs/protocol.md gives WELCOME's version as {sorted(said)}, not {P.VERSION}"
    for name in ("CALL_HDR", "RESULT_HDR"):
        st = getattr(P, name, None)
        if st is not None:  # (a header described by a struct: the doc says its size)
            assert f"**{st.size} bytes**" in text, f"docs/protocol.md does not give {name}'s size, {st.size} bytes"
