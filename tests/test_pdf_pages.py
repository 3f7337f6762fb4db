"""Tests for app.pdf_pages, using real PDFs built with PyMuPDF."""

from __future__ import annotations

import io
import threading

import pymupdf
import pytest
from PIL import Image

from app.pdf_pages import (
    LimitedPages,
    PdfDocument,
    PdfError,
    RenderCancelled,
    format_page_selection,
    iter_render_pages,
    limit_pages,
    open_pdf,
    parse_page_selection,
    render_pages,
)

A4 = (595, 842)
RED, GREEN, BLUE, YELLOW = (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)


def build_pdf(pages: list[tuple[float, float, tuple[float, float, float]]], *, label: bool = True) -> bytes:
    """A PDF whose pages have the given (width, height, fill colour).

    Each page is filled with its colour (so a rendered pixel tells which
    page came out) and carries its page number in big black text.
    """
    doc = pymupdf.open()
    for number, (width, height, colour) in enumerate(pages, start=1):
        page = doc.new_page(width=width, height=height)
        page.draw_rect(page.rect, color=colour, fill=colour)
        if label:
            page.insert_text((10, 60), str(number), fontsize=48, color=(0, 0, 0))
    data = doc.tobytes()
    doc.close()
    return data


def centre_rgb(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((image.width // 2, image.height // 2))


def close_to(actual: tuple[int, ...], expected: tuple[float, ...]) -> bool:
    return all(abs(a - round(e * 255)) <= 3 for a, e in zip(actual, expected))


@pytest.fixture
def four_pages() -> bytes:
    # portrait, landscape, square, small portrait
    return build_pdf([(*A4, RED), (842, 595, GREEN), (500, 500, BLUE), (200, 300, YELLOW)])


# -- opening ---------------------------------------------------------------------


def test_open_from_bytes_and_path(tmp_path, four_pages):
    with open_pdf(four_pages) as doc:
        assert isinstance(doc, PdfDocument)
        assert doc.page_count == 4
    assert doc.closed

    path = tmp_path / "report.pdf"
    path.write_bytes(four_pages)
    with open_pdf(path) as doc:
        assert doc.page_count == 4
        assert doc.name == "report.pdf"
        assert doc.page_size(1) == (842, 595)
    with open_pdf(str(path)) as doc:
        assert doc.page_count == 4


def test_closed_document_refuses_to_render(four_pages):
    doc = open_pdf(four_pages)
    doc.close()
    doc.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        doc.render(0, 100)


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"hello, this is plain text", "not a PDF"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a PDF"),
    (b"%PDF-1.7\n" + bytes(range(256)) * 8, "damaged or not a valid PDF"),
])
def test_garbage_is_rejected(data, match):
    with pytest.raises(PdfError, match=match):
        open_pdf(data)


def test_damaged_file_is_named_without_its_folder(tmp_path):
    # The file is in the server's upload cache: its path would mean nothing to the user, and shows where
    # the server keeps its files.
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8)
    with pytest.raises(PdfError, match="report.pdf is damaged or not a valid PDF") as raised:
        open_pdf(path)
    assert str(tmp_path) not in str(raised.value)


def test_truncated_pdf_is_rejected_or_repaired(four_pages):
    # MuPDF repairs what it can; whatever it does, the caller sees either a
    # usable document or a PdfError, never a raw MuPDF exception.
    try:
        with open_pdf(four_pages[: len(four_pages) // 3]) as doc:
            assert doc.page_count >= 1
    except PdfError:
        pass


def test_zero_page_pdf_is_rejected():
    # PyMuPDF refuses to save an empty document, so write one by hand.
    empty = (b"%PDF-1.4\n"
             b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
             b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
             b"trailer << /Root 1 0 R >>\n%%EOF\n")
    with pytest.raises(PdfError, match="no pages"):
        open_pdf(empty)


def test_password_protected_pdf_is_rejected(tmp_path):
    doc = pymupdf.open(stream=build_pdf([(*A4, RED)]), filetype="pdf")
    path = tmp_path / "secret.pdf"
    doc.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")
    doc.close()
    with pytest.raises(PdfError, match="secret.pdf is password-protected"):
        open_pdf(path)


def test_owner_password_only_pdf_opens():
    # Encrypted for permissions but readable without a password: must work.
    doc = pymupdf.open(stream=build_pdf([(*A4, RED)]), filetype="pdf")
    data = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="", owner_pw="owner")
    doc.close()
    with open_pdf(data) as pdf:
        assert close_to(centre_rgb(pdf.render(0, 64)), RED)


def test_size_limit(tmp_path, four_pages):
    with pytest.raises(PdfError, match="over the .* limit"):
        open_pdf(four_pages, max_bytes=100)
    path = tmp_path / "big.pdf"
    path.write_bytes(four_pages)
    with pytest.raises(PdfError, match="big.pdf is .* over the"):
        open_pdf(path, max_bytes=100)
    with open_pdf(path, max_bytes=len(four_pages)) as doc:
        assert doc.page_count == 4


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PdfError, match="cannot read nope.pdf"):
        open_pdf(tmp_path / "nope.pdf")
    with pytest.raises(PdfError, match="not a file"):
        open_pdf(tmp_path)


# -- rendering -------------------------------------------------------------------


@pytest.mark.parametrize("long_side", [1024, 384])
def test_render_long_side_is_exact(four_pages, long_side):
    with open_pdf(four_pages) as doc:
        sizes = [doc.render(i, long_side).size for i in range(doc.page_count)]
    portrait_short = round(long_side * 595 / 842)
    assert sizes == [
        (portrait_short, long_side),           # A4 portrait
        (long_side, portrait_short),           # A4 landscape
        (long_side, long_side),                # square
        (round(long_side * 2 / 3), long_side),  # 200x300
    ]


def test_render_returns_rgb_of_the_right_page(four_pages):
    with open_pdf(four_pages) as doc:
        for index, colour in enumerate([RED, GREEN, BLUE, YELLOW]):
            image = doc.render(index, 256)
            assert image.mode == "RGB"
            assert close_to(centre_rgb(image), colour), (index, centre_rgb(image))


def test_render_draws_page_content(four_pages):
    # The page number is drawn in black near the top-left corner.
    with open_pdf(four_pages) as doc:
        image = doc.render(0, 1024)
    corner = image.crop((0, 0, image.width // 4, image.height // 8))
    darkest, _ = corner.convert("L").getextrema()
    assert darkest < 20


def test_render_honours_page_rotation():
    doc = pymupdf.open(stream=build_pdf([(300, 200, BLUE)]), filetype="pdf")
    doc[0].set_rotation(90)
    data = doc.tobytes()
    doc.close()
    with open_pdf(data) as pdf:
        assert pdf.render(0, 600).size == (400, 600)


def test_render_rejects_bad_arguments(four_pages):
    with open_pdf(four_pages) as doc:
        with pytest.raises(IndexError):
            doc.render(4, 100)
        with pytest.raises(IndexError):
            doc.render(-1, 100)
        with pytest.raises(ValueError):
            doc.render(0, 0)
        with pytest.raises(ValueError):
            doc.render(0, 100_000)


def test_thumbnail_is_small_png(four_pages):
    with open_pdf(four_pages) as doc:
        data = doc.thumbnail(1)
        small = doc.thumbnail(0, max_side=48)
    assert data.startswith(b"\x89PNG")
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (160, round(160 * 595 / 842))
    assert close_to(centre_rgb(image), GREEN)
    assert Image.open(io.BytesIO(small)).size == (34, 48)


def test_huge_pdf_opens_fast_and_renders_lazily(monkeypatch):
    data = build_pdf([(200, 300, (i % 2, 0, 1 - i % 2)) for i in range(500)], label=False)
    calls: list[int] = []
    original = pymupdf.Page.get_pixmap

    def counting_get_pixmap(self, *args, **kwargs):
        calls.append(self.number)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pymupdf.Page, "get_pixmap", counting_get_pixmap)
    with open_pdf(data) as doc:
        assert doc.page_count == 500
        assert calls == []  # opening renders nothing
        first = Image.open(io.BytesIO(doc.thumbnail(0))).convert("RGB")
        last = Image.open(io.BytesIO(doc.thumbnail(499))).convert("RGB")
    assert calls == [0, 499]  # only the two pages asked for were rendered (its speed: benchmarks, not here)
    assert close_to(centre_rgb(first), BLUE)
    assert close_to(centre_rgb(last), RED)


# -- page selection --------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1", [0]),
    ("1-3, 5, 8-", [0, 1, 2, 4, 7, 8, 9]),
    ("all", list(range(10))),
    (" ALL ", list(range(10))),
    ("*", list(range(10))),
    ("5, 1-2, 5, 2", [4, 0, 1]),          # order kept, duplicates dropped
    ("-3", [0, 1, 2]),
    ("9 - 10", [8, 9]),
    ("2\u20134", [1, 2, 3]),              # en dash pasted from a document
    ("1;3,", [0, 2]),
    ("10", [9]),
    ("4-4", [3]),
])
def test_parse_page_selection(text, expected):
    assert parse_page_selection(text, 10) == expected


@pytest.mark.parametrize("text, page_count, match", [
    ("0", 5, "start at 1"),
    ("0-2", 5, "start at 1"),
    ("7", 5, "page 7 does not exist; the PDF has 5 pages"),
    ("2-9", 5, "page 9 does not exist"),
    ("2", 1, "the PDF has 1 page$"),
    ("3-1", 5, r"'3-1' goes backwards; did you mean 1-3\?"),
    ("abc", 5, "'abc' is not a page number or range"),
    ("1, x", 5, "'x' is not a page number"),
    ("1.5", 5, "not a page number"),
    ("-", 5, "not a page number"),
    ("1-2-3", 5, "not a page number"),
    ("", 5, "no pages selected"),
    ("   ", 5, "no pages selected"),
    (", ,", 5, "no pages selected"),
])
def test_parse_page_selection_errors(text, page_count, match):
    with pytest.raises(PdfError, match=match):
        parse_page_selection(text, page_count)


def test_parse_page_selection_is_bounded_by_page_count():
    # A huge PDF with "all" is fine; an absurd range fails before expanding.
    assert len(parse_page_selection("all", 100_000)) == 100_000
    with pytest.raises(PdfError, match="does not exist"):
        parse_page_selection("1-999999999999", 10)


def test_format_page_selection_round_trips():
    assert format_page_selection([0, 1, 2, 4, 7, 8, 9]) == "1-3, 5, 8-10"
    assert format_page_selection([4, 0, 1]) == "5, 1-2"
    assert format_page_selection([]) == ""
    indices = [0, 1, 2, 4, 7]
    assert parse_page_selection(format_page_selection(indices), 10) == indices


def test_limit_pages():
    assert limit_pages([3, 1, 2], 5) == LimitedPages([3, 1, 2], [], None)
    assert limit_pages([0, 1], 2).message is None
    kept = limit_pages([0, 1, 2, 3, 9], 3)
    assert kept.pages == [0, 1, 2]
    assert kept.dropped == [3, 9]
    assert kept.message == ("Only 3 pages fit in the model's context: using page(s) 1-3 "
                            "of the 5 selected; skipped 4, 10.")
    assert "Only 1 page fits" in limit_pages([0, 1], 1).message
    with pytest.raises(PdfError, match="no room"):
        limit_pages([0], 0)


# -- batch rendering: progress and cancellation -----------------------------------


def test_render_pages_reports_progress(four_pages):
    seen: list[tuple[int, int]] = []
    with open_pdf(four_pages) as doc:
        images = render_pages(doc, [2, 0], 128, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 2), (1, 2), (2, 2)]
    assert close_to(centre_rgb(images[0]), BLUE)
    assert close_to(centre_rgb(images[1]), RED)
    assert images[0].size == (128, 128)


def test_render_pages_can_be_cancelled(four_pages):
    stop = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            stop.set()  # e.g. the user pressed Stop while page 2 rendered

    with open_pdf(four_pages) as doc:
        with pytest.raises(RenderCancelled, match="after 2 of 4"):
            render_pages(doc, [0, 1, 2, 3], 64, progress=progress, cancel=stop.is_set)
    assert seen == [0, 1, 2]


def test_iter_render_pages_streams(four_pages):
    with open_pdf(four_pages) as doc:
        stream = iter_render_pages(doc, [3, 1], 100)
        index, image = next(stream)
        assert index == 3 and image.size == (67, 100)
        assert [i for i, _ in stream] == [1]


def test_concurrent_thumbnails_and_renders(four_pages):
    # The UI may fetch thumbnails while a worker renders; MuPDF needs the lock.
    errors: list[BaseException] = []
    with open_pdf(four_pages) as doc:
        def work(fn):
            try:
                for _ in range(10):
                    fn()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(lambda: doc.thumbnail(1),)),
                   threading.Thread(target=work, args=(lambda: doc.render(2, 200),))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


def test_toggle_page_adds_and_removes_and_keeps_a_bad_selection():
    from app.pdf_pages import toggle_page

    assert toggle_page("", 2, 5) == "3"
    assert toggle_page("1-3", 1, 5) == "1, 3"
    assert toggle_page("1, 3", 1, 5) == "1-3"
    assert toggle_page("1-x", 4, 5) == "1-x, 5"  # the user's text stays, to fix by hand


def test_preview_gives_thumbnails_and_a_note():
    from app.pdf_pages import preview

    pdf = preview(build_pdf([(*A4, RED)] * 7), max_thumbnails=3)
    assert pdf.page_count == 7 and [label for _, label in pdf.thumbnails] == ["Page 1", "Page 2", "Page 3"]
    assert "7 pages" in pdf.note and "first 3 pages" in pdf.note
    with pytest.raises(PdfError):
        preview(b"%PDF-1.4 not really")
