"""The nesting depth of JSON text, counted on its bytes before anything parses it (see
`service.limits.JsonDepthLimit`). Apart from the ASGI middleware so that what reads JSON
outside a request (`ratebench import`'s bundle: `service.export`) checks the same limit without
importing FastAPI."""

from __future__ import annotations

from worker.spec import MAX_JSON_DEPTH

__all__ = ["DepthScanner", "json_depth_exceeded"]


class DepthScanner:
    """The nesting depth of JSON text fed in pieces: `[` and `{` outside strings open a level."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth, self.depth = max_depth, 0
        self.in_string = self.escaped = False

    def feed(self, chunk: bytes) -> bool:
        """True once the text so far nests deeper than `max_depth`."""
        for byte in chunk:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif byte == 0x5C:  # backslash
                    self.escaped = True
                elif byte == 0x22:  # quote
                    self.in_string = False
            elif byte == 0x22:
                self.in_string = True
            elif byte in (0x5B, 0x7B):  # [ {
                self.depth += 1
                if self.depth > self.max_depth:
                    return True
            elif byte in (0x5D, 0x7D):
                self.depth -= 1
        return False


def json_depth_exceeded(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON `text` nests deeper than `max_depth` (checked before parsing it)."""
    return DepthScanner(max_depth).feed(text.encode() if isinstance(text, str) else text)
