"""Pictures people would rather look at than read: labelled image grids."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: a fixed-size bitmap font
        return ImageFont.load_default()


def wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap to lines of at most `width` characters (longer words stay whole)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def image_grid(
    images: list[Image.Image],
    labels: list[str] | None = None,
    columns: int = 8,
    cell: int = 128,
    title: str = "",
    label_lines: int = 2,
    colors: list[str] | None = None,
) -> Image.Image:
    """Images upscaled (nearest neighbour) into `cell`-pixel squares, each with a wrapped label underneath."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    labels = labels or [""] * len(images)
    colors = colors or ["black"] * len(images)
    small = font(max(10, cell // 12))
    line_h = max(12, cell // 10)
    label_h = label_lines * line_h + 4 if any(labels) else 0
    title_h = 28 if title else 0
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (min(columns, len(images)) * cell, title_h + rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 6), title, fill="black", font=font(14))
    chars = max(8, int(cell / (0.55 * max(10, cell // 12))))
    for i, (image, label, color) in enumerate(zip(images, labels, colors, strict=True)):
        x, y = (i % columns) * cell, title_h + (i // columns) * (cell + label_h)
        sheet.paste(
            image.convert("RGB").resize((cell - 6, cell - 6), Image.Resampling.NEAREST), (x + 3, y + 3)
        )
        for k, line in enumerate(wrap(label, chars)[:label_lines]):
            draw.text((x + 4, y + cell + k * line_h), line, fill=color, font=small)
    return sheet
