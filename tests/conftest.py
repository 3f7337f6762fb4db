import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The reference vectors of the official code; further case sets in the same layout can be dropped in.
REFERENCE_DIR = Path(os.environ.get("DSVL_REFERENCE_DIR") or REPO.parent / "shared" / "reference")


def stop_process(process, timeout: float = 10) -> None:
    """Terminate a server started by a test; kill it if it does not exit in time."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
