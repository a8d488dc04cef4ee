"""What the window's text may contain: stock fonts render every glyph the studio writes."""

import ast
from pathlib import Path

UI = Path(__file__).parents[1] / "ui"

# Code points with a default emoji presentation (Unicode's Emoji_Presentation=Yes, the blocks and singles
# below): stock Linux fonts (DejaVu, Noto Sans) have no glyph for them, so they render as an empty box.
EMOJI = [(0x231A, 0x231B), (0x23E9, 0x23EC), (0x23F0, 0x23F0), (0x23F3, 0x23F3), (0x25FD, 0x25FE),
         (0x2614, 0x2615), (0x2648, 0x2653), (0x267F, 0x267F), (0x2693, 0x2693), (0x26A1, 0x26A1),
         (0x26AA, 0x26AB), (0x26BD, 0x26BE), (0x26C4, 0x26C5), (0x26CE, 0x26CE), (0x26D4, 0x26D4),
         (0x26EA, 0x26EA), (0x26F2, 0x26F3), (0x26F5, 0x26F5), (0x26FA, 0x26FA), (0x26FD, 0x26FD),
         (0x2705, 0x2705), (0x270A, 0x270B), (0x2728, 0x2728), (0x274C, 0x274C), (0x274E, 0x274E),
         (0x2753, 0x2755), (0x2757, 0x2757), (0x2795, 0x2797), (0x27B0, 0x27B0), (0x27BF, 0x27BF),
         (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55), (0xFE0F, 0xFE0F), (0x1F000, 0x1FAFF)]


def is_emoji(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in EMOJI)


def test_the_emoji_table_knows_the_ones_that_rendered_as_boxes():
    assert is_emoji("⏳") and is_emoji("✅") and is_emoji("🚀")
    assert not any(is_emoji(ch) for ch in "░∎∅…·–—→×÷≈Δ")  # the studio's own glyphs: DejaVu has them


def test_no_emoji_in_ui_text():
    found = []
    for path in sorted(UI.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [f"{path.name}:{node.lineno}: {ch!r}" for ch in node.value if is_emoji(ch)]
    assert not found, f"emoji in UI text (no stock font draws them): {found}"
