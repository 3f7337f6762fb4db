"""The scratch space (app.scratch): one folder per live instance inside the data directory, cleaned at exit and
on the next start, and `forget` removing every copy of deleted attachments."""

import hashlib
import io

from PIL import Image

from app import viewer
from app.scratch import Scratch
from app.store import Store


def png(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def files_holding(root, data: bytes) -> list:
    """Every file under `root` whose bytes contain `data`."""
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def test_start_removes_what_ended_instances_left_but_not_a_live_ones(tmp_path):
    with Store(tmp_path) as earlier, Store(tmp_path) as live:
        left = Scratch.of(earlier)
        left.start()
        left.file("export.json").write_text("{}")
        running = Scratch.of(live)
        running.start()
        (tmp_path / "tmp" / "stray.png").write_bytes(png("red"))
        running.file("page-1.png").write_bytes(png("blue"))
        earlier.close()  # that app ended without cleaning up (killed)

        with Store(tmp_path) as store:
            scratch = Scratch.of(store)
            assert scratch.start() == 2
            assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted([store.instance_id,
                                                                                   live.instance_id])
            assert scratch.gradio_dir.is_dir() and scratch.files_dir.is_dir()
            assert files_holding(tmp_path / "tmp", png("blue"))  # the live instance's file is left alone
            path = scratch.file("../../screenshot.png")
            assert path.name == "screenshot.png" and path.parent.parent.parent == scratch.files_dir
            assert scratch.made_for(path.resolve(), viewer.OWNER) and not scratch.made_for(path.resolve(), "bob")
            scratch.close()
            assert not scratch.dir.exists() and running.dir.exists()


def test_forget_removes_every_copy_of_deleted_attachments(tmp_path):
    with Store(tmp_path) as store, Store(tmp_path) as other:
        scratch, other_scratch = Scratch.of(store), Scratch.of(other)
        scratch.start()
        other_scratch.start()
        store.on_attachments_deleted(scratch.forget)
        red, blue = png("red"), png("blue")
        # An upload in gradio's cache, a rendered page, the other instance's copy, an export holding it
        # (and gradio's byte-identical copy of that export), and a file that is not the image.
        (scratch.gradio_dir / "abc").mkdir()
        (scratch.gradio_dir / "abc" / "photo.png").write_bytes(red)
        scratch.file("page-1.png").write_bytes(red)
        other_scratch.file("screenshot.png").write_bytes(red)
        export = scratch.write("chat.zip", b"PK zip holding the red image " + red, holds=[hashlib.sha256(red).hexdigest()])
        (scratch.gradio_dir / "def").mkdir()
        (scratch.gradio_dir / "def" / "chat.zip").write_bytes(export.read_bytes())
        scratch.file("notes.txt").write_text("unrelated")

        cid = store.create_conversation()
        store.add_message(cid, "user", "look", [store.add_attachment(red), store.add_attachment(blue)])
        kept_elsewhere = store.create_conversation()
        store.add_message(kept_elsewhere, "user", "blue again", [store.add_attachment(blue)])
        scratch.file("blue.png").write_bytes(blue)

        store.delete_conversation(cid)
        assert files_holding(tmp_path, red) == []  # nowhere in the data directory, scratch or not
        assert files_holding(scratch.dir, blue)  # still used by the other conversation
        assert [p.name for p in scratch.files_dir.rglob("*.txt")] == ["notes.txt"]

        # Deleting the last message that uses an image (not the conversation) removes its copies too.
        [message] = store.get_conversation(kept_elsewhere)["messages"]
        store.delete_message(message["id"])
        assert files_holding(tmp_path, blue) == []


def test_forget_of_nothing_touches_nothing(tmp_path):
    with Store(tmp_path) as store:
        scratch = Scratch.of(store)
        scratch.start()
        scratch.file("a.png").write_bytes(png("red"))
        assert scratch.forget([]) == 0
        assert scratch.forget([hashlib.sha256(b"other").hexdigest()]) == 0
        assert len(list(scratch.files_dir.rglob("*.png"))) == 1
