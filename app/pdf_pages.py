"""Turn PDF pages into images the vision-language model can read.

Built on PyMuPDF. Documents are opened lazily: opening a 2,000-page PDF
reads only its cross-reference table, and pages are rasterised one at a
time when a thumbnail or a model-sized render is asked for. That keeps
huge PDFs usable; how many pages actually reach the model is bounded by
the caller (see `limit_pages`), because only the caller knows how many
images fit in the model's context.

User-facing problems (not a PDF, password needed, bad page selection...)
raise `PdfError`, a `ValueError` whose message can be shown to the user
as is.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pymupdf
from PIL import Image

DEFAULT_MAX_BYTES = 200 * 1024 * 1024
THUMBNAIL_MAX_SIDE = 160
# Far above any model input size; stops a typo from allocating gigabytes.
MAX_RENDER_SIDE = 8192
# The PDF spec lets readers tolerate junk before the header; Acrobat looks
# within the first 1024 bytes, so we do the same.
_HEADER_WINDOW = 1024

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class PdfError(ValueError):
    """A problem with a PDF or a page selection, worded for the user."""


class RenderCancelled(Exception):
    """Raised by `iter_render_pages` / `render_pages` when `cancel()` is true.

    Deliberately not a `PdfError`: nothing is wrong with the document, the
    user just stopped the job.
    """


class PdfDocument:
    """An open PDF. Use as a context manager or call `close()`.

    MuPDF documents are not thread-safe, and a UI may ask for thumbnails
    while a worker renders pages, so every page access holds a lock.
    """

    def __init__(self, doc: pymupdf.Document, name: str) -> None:
        self._doc = doc
        self._lock = threading.Lock()
        self.name = name

    @property
    def page_count(self) -> int:
        return self._doc.page_count

    @property
    def closed(self) -> bool:
        return self._doc.is_closed

    def page_size(self, index: int) -> tuple[float, float]:
        """Page (width, height) in PDF points, after the page's rotation."""
        with self._lock:
            rect = self._page(index).rect
        return rect.width, rect.height

    def thumbnail(self, index: int, max_side: int = THUMBNAIL_MAX_SIDE) -> bytes:
        """A small PNG preview of one page, its longer side `max_side` px."""
        return _png_bytes(self.render(index, max_side))

    def render(self, index: int, long_side: int) -> Image.Image:
        """Render one page as an RGB image whose longer side is exactly `long_side` px.

        The app passes the loaded model's native input size (1024 for the
        7B, 384 for the 1.3B), so the page is rasterised once at the right
        resolution instead of being rendered big and downscaled.
        """
        if not isinstance(long_side, int) or not 1 <= long_side <= MAX_RENDER_SIDE:
            raise ValueError(f"long_side must be an int in 1..{MAX_RENDER_SIDE}, got {long_side!r}")
        with self._lock:
            page = self._page(index)
            rect = page.rect
            if rect.width <= 0 or rect.height <= 0:
                raise PdfError(f"page {index + 1} has an empty page box and cannot be rendered")
            target = _target_size(rect.width, rect.height, long_side)
            # Separate x/y zoom so both sides land on whole pixels.
            matrix = pymupdf.Matrix(target[0] / rect.width, target[1] / rect.height)
            try:
                pix = page.get_pixmap(matrix=matrix, alpha=False, colorspace=pymupdf.csRGB)
            except Exception as exc:  # MuPDF raises plain RuntimeErrors for broken content
                raise PdfError(f"page {index + 1} could not be rendered: {exc}") from exc
            image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
        if image.size != target:
            # MuPDF rounds the pixel box outward; fix an off-by-one edge.
            image = image.resize(target, Image.Resampling.LANCZOS)
        return image

    def close(self) -> None:
        with self._lock:
            if not self._doc.is_closed:
                self._doc.close()

    def __enter__(self) -> PdfDocument:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.page_count} pages"
        return f"<PdfDocument {self.name!r} {state}>"

    def _page(self, index: int) -> pymupdf.Page:
        if self._doc.is_closed:
            raise ValueError("PDF document is closed")
        if not isinstance(index, int) or not 0 <= index < self._doc.page_count:
            raise IndexError(f"page index {index!r} out of range (document has {self._doc.page_count} pages)")
        return self._doc.load_page(index)


def open_pdf(source: str | os.PathLike[str] | bytes | bytearray | memoryview,
             *, max_bytes: int = DEFAULT_MAX_BYTES) -> PdfDocument:
    """Open a PDF from a file path or from its bytes.

    Raises `PdfError` if the data is not a readable PDF, needs a password,
    has no pages, or is larger than `max_bytes`. A large page count is
    fine: pages are only loaded when used.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "uploaded PDF"
        _check_size(len(data), max_bytes, name)
        _check_header(data[:_HEADER_WINDOW], name)
        opener = lambda: pymupdf.open(stream=data, filetype="pdf")  # noqa: E731
    else:
        path = Path(source)
        name = path.name
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise PdfError(f"{name} is not a file")
            with path.open("rb") as fh:
                head = fh.read(_HEADER_WINDOW)
        except OSError as exc:
            raise PdfError(f"cannot read {name}: {exc.strerror or exc}") from exc
        _check_size(size, max_bytes, name)
        _check_header(head, name)
        # Opening by path lets MuPDF read on demand instead of loading it all.
        opener = lambda: pymupdf.open(path, filetype="pdf")  # noqa: E731

    try:
        doc = opener()
    except Exception as exc:  # FileDataError, EmptyFileError, RuntimeError from MuPDF
        # MuPDF's message quotes the full path: a server's temp folder means nothing to the user.
        detail = str(exc)
        if not isinstance(source, (bytes, bytearray, memoryview)):
            for spelling in {str(source), str(Path(source)), str(Path(source).resolve())}:
                detail = detail.replace(spelling, name)
        raise PdfError(f"{name} is damaged or not a valid PDF ({detail})") from exc

    try:
        if doc.needs_pass:
            raise PdfError(f"{name} is password-protected; remove the password (e.g. print it to a new PDF) and try again")
        if doc.page_count == 0:
            raise PdfError(f"{name} has no pages")
    except BaseException:
        doc.close()
        raise
    return PdfDocument(doc, name)


def parse_page_selection(text: str, page_count: int) -> list[int]:
    """Parse user input like "1-3, 5, 8-" or "all" into 0-based page indices.

    Users count pages from 1. Order is kept as typed and repeats are
    dropped. "-4" means pages 1 to 4, "8-" means page 8 to the end.
    Raises `PdfError` with a message that says what to fix.
    """
    if page_count < 1:
        raise PdfError("the PDF has no pages to select")
    cleaned = (text or "").strip().replace("\u2013", "-").replace("\u2014", "-")  # en/em dashes from copy-paste
    if not cleaned:
        raise PdfError("no pages selected; enter pages like '1-3, 5' or 'all'")
    if cleaned.lower() in {"all", "*"}:
        return list(range(page_count))

    selected: dict[int, None] = {}  # an ordered set
    for part in re.split(r"[,;]", cleaned):
        part = part.strip()
        if not part:
            continue
        first, last = _parse_part(part, page_count)
        for number in range(first, last + 1):
            selected.setdefault(number - 1)
    if not selected:
        raise PdfError("no pages selected; enter pages like '1-3, 5' or 'all'")
    return list(selected)


def format_page_selection(indices: Iterable[int]) -> str:
    """The inverse of `parse_page_selection`: [0, 1, 2, 4] -> "1-3, 5"."""
    runs: list[list[int]] = []
    for number in (i + 1 for i in indices):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def toggle_page(selection_text: str, index: int, page_count: int) -> str:
    """The selection with page `index` (0-based) added or removed, as typed text. A selection that does not
    parse is kept as the user typed it, with the page appended for them to fix."""
    try:
        chosen = parse_page_selection(selection_text, page_count) if (selection_text or "").strip() else []
    except PdfError:
        return f"{selection_text}, {index + 1}"
    chosen = [i for i in chosen if i != index] if index in chosen else sorted(chosen + [index])
    return format_page_selection(chosen)


class PdfPreview(NamedTuple):
    page_count: int
    thumbnails: list[tuple[Image.Image, str]]  # (thumbnail, "Page N") for the first pages
    note: str  # how to pick pages, and whether thumbnails were cut short


def preview(source: str | os.PathLike[str] | bytes, max_thumbnails: int = 60) -> PdfPreview:
    """Thumbnails of the first pages of a PDF and a one-line note; PdfError for a bad file."""
    with open_pdf(source) as doc:
        count = doc.page_count
        shown = min(count, max_thumbnails)
        thumbs = [(Image.open(io.BytesIO(doc.thumbnail(i))), f"Page {i + 1}") for i in range(shown)]
    pages = "page" if count == 1 else "pages"
    note = f"{count} {pages}. Type pages like `1-3, 5` or click thumbnails, then **Attach pages**."
    if shown < count:
        note += f" (Thumbnails of the first {shown} pages shown; any page can be typed.)"
    return PdfPreview(count, thumbs, note)


class LimitedPages(NamedTuple):
    pages: list[int]        # the indices to use, in the caller's order
    dropped: list[int]      # indices left out, empty when everything fits
    message: str | None     # a note for the user when something was left out


def limit_pages(pages: Sequence[int], max_pages: int) -> LimitedPages:
    """Keep at most `max_pages` of `pages` (the caller's context budget).

    Truncation is not an error: the first `max_pages` are kept and
    `message` explains what was skipped so the UI can show it. If not even
    one page fits (`max_pages < 1`), raises `PdfError`, since sending the
    message without any page would silently ignore the PDF.
    """
    pages = list(pages)
    if max_pages < 1:
        raise PdfError("there is no room left in the conversation for page images; start a new chat or remove earlier images")
    if len(pages) <= max_pages:
        return LimitedPages(pages, [], None)
    kept, dropped = pages[:max_pages], pages[max_pages:]
    noun = "page fits" if max_pages == 1 else "pages fit"
    message = (f"Only {max_pages} {noun} in the model's context: using page(s) {format_page_selection(kept)} "
               f"of the {len(pages)} selected; skipped {format_page_selection(dropped)}.")
    return LimitedPages(kept, dropped, message)


def iter_render_pages(doc: PdfDocument, indices: Sequence[int], long_side: int, *,
                      progress: ProgressFn | None = None,
                      cancel: CancelFn | None = None) -> Iterator[tuple[int, Image.Image]]:
    """Render pages one by one, yielding (index, image).

    `progress(done, total)` is called once before the first page and after
    each page; `cancel()` (e.g. `threading.Event().is_set`) is checked
    before each page and raises `RenderCancelled` when true.
    """
    total = len(indices)
    if progress:
        progress(0, total)
    for done, index in enumerate(indices, start=1):
        if cancel and cancel():
            raise RenderCancelled(f"rendering cancelled after {done - 1} of {total} pages")
        image = doc.render(index, long_side)
        if progress:
            progress(done, total)
        yield index, image


def render_pages(doc: PdfDocument, indices: Sequence[int], long_side: int, *,
                 progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None) -> list[Image.Image]:
    """Render all `indices` and return the images in the same order.

    Same progress/cancel contract as `iter_render_pages`; on cancel the
    partial result is discarded and `RenderCancelled` propagates.
    """
    return [image for _, image in iter_render_pages(doc, indices, long_side, progress=progress, cancel=cancel)]


# -- helpers -----------------------------------------------------------------

_PART_RE = re.compile(r"^(\d+)?\s*-\s*(\d+)?$")


def _parse_part(part: str, page_count: int) -> tuple[int, int]:
    """One comma-separated item -> an inclusive 1-based (first, last) range."""
    hint = "examples: 1-3, 5, 8-, all"
    if part.isdigit():
        first = last = int(part)
    else:
        match = _PART_RE.match(part)
        if not match or match.group(1) is None and match.group(2) is None:
            raise PdfError(f"'{part}' is not a page number or range ({hint})")
        first = int(match.group(1)) if match.group(1) is not None else 1
        last = int(match.group(2)) if match.group(2) is not None else page_count
    for number in (first, last):
        if number < 1:
            raise PdfError(f"page numbers start at 1; '{part}' is not valid")
        if number > page_count:
            pages = "page" if page_count == 1 else "pages"
            raise PdfError(f"page {number} does not exist; the PDF has {page_count} {pages}")
    if first > last:
        raise PdfError(f"range '{part}' goes backwards; did you mean {last}-{first}?")
    return first, last


def _target_size(width: float, height: float, long_side: int) -> tuple[int, int]:
    scale = long_side / max(width, height)
    if width >= height:
        return long_side, max(1, round(height * scale))
    return max(1, round(width * scale)), long_side


def _check_size(size: int, max_bytes: int, name: str) -> None:
    if size > max_bytes:
        raise PdfError(f"{name} is {_megabytes(size)}, over the {_megabytes(max_bytes)} limit")


def _check_header(head: bytes, name: str) -> None:
    if not head:
        raise PdfError(f"{name} is empty")
    if b"%PDF-" not in head:
        raise PdfError(f"{name} is not a PDF file")


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Thumbnails are tiny; fast compression beats small files here.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
