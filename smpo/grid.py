"""Image grids with captions: two rows of images (e.g. base over tuned, best over worst), a caption under each column."""

GRID_MAX_CELL = 256  # grid cells are at most this wide (images are scaled down, never up)
GRID_CAPTION_HEIGHT = 40  # px under each pair: 3 lines of a 10-px font, 12 px apart, + padding
GRID_CAPTION_LINES = 3
GRID_LINE_HEIGHT = 12


def make_grid(top_images, bottom_images, captions, max_cell=GRID_MAX_CELL):
    """``top_images`` in the top row, ``bottom_images`` in the bottom row, each caption under its column.

    Cells are min(image width, max_cell) wide (aspect kept); the image is
    (columns * cell_width) x (2 * cell_height + GRID_CAPTION_HEIGHT).
    """
    from PIL import Image, ImageDraw

    width, height = top_images[0].size
    cell_w = min(width, max_cell)
    cell_h = max(1, round(height * cell_w / width))
    grid = Image.new("RGB", (cell_w * len(captions), 2 * cell_h + GRID_CAPTION_HEIGHT), "white")
    draw, font = ImageDraw.Draw(grid), caption_font()
    for col, (top, bottom, caption) in enumerate(zip(top_images, bottom_images, captions)):
        x = col * cell_w
        grid.paste(top.convert("RGB").resize((cell_w, cell_h)), (x, 0))
        grid.paste(bottom.convert("RGB").resize((cell_w, cell_h)), (x, cell_h))
        for line_no, line in enumerate(wrap_caption(caption, draw, font, cell_w - 4)):
            draw.text((x + 2, 2 * cell_h + 2 + line_no * GRID_LINE_HEIGHT), line, fill="black", font=font)
    return grid


def caption_font(size=10):
    """DejaVu Sans where installed (accented Latin, Greek, Cyrillic), else PIL's default font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def wrap_caption(text, draw, font, max_width, max_lines=GRID_CAPTION_LINES):
    """Lines of text that fit max_width px (words, or characters of a long word); '...' if cut."""
    lines, line = [], ""
    for char in text:
        if char == "\n":
            char = " "
        if draw.textlength(line + char, font=font) <= max_width or not line:
            line += char
            continue
        head, sep, tail = line.rpartition(" ")  # break at the last space if there is one
        if sep and head:
            lines.append(head)
            line = tail + char
        else:
            lines.append(line)
            line = char.lstrip()
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > max_width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines
