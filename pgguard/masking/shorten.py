"""Shortening long masked text for size-limited channels (the Teams card).

Owns: `shorten_middle`. Invariant: the result is at most `max_bytes` in UTF-8, keeps the head
and the tail of the text, never splits a character, and marks the cut with a SQL comment.
"""

from __future__ import annotations

# Teams rejects a message larger than 28 KB; the statement gets what the rest of the card leaves.
TEAMS_MESSAGE_LIMIT_BYTES = 28 * 1024


def _note(cut: int) -> str:
    return f"\n/* ... {cut} bytes cut ... */\n"


def shorten_middle(text: str, max_bytes: int) -> str:
    """`text` itself if it fits, else its head and tail around `/* ... N bytes cut ... */`."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = len(data)
    for _ in range(8):  # converges in at most two rounds (the note's digit count)
        note = _note(cut).encode("utf-8")
        keep = max_bytes - len(note)
        if keep < 0:
            return ""
        new_cut = len(data) - keep
        if new_cut == cut:
            break
        cut = new_cut
    head = _whole_chars(data[: keep - keep // 2], from_end=False)
    tail = _whole_chars(data[len(data) - keep // 2 :], from_end=True)
    cut = len(data) - len(head.encode()) - len(tail.encode())
    return f"{head}{_note(cut)}{tail}"


def _whole_chars(chunk: bytes, *, from_end: bool) -> str:
    """Decode a byte chunk, dropping a character split at the cut."""
    for trim in range(4):
        piece = chunk[trim:] if from_end else chunk[: len(chunk) - trim]
        try:
            return piece.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""
