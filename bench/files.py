"""What every bench command does with its output folder and its figures."""
from __future__ import annotations

import io
import os
from pathlib import Path

from data.errors import UserError
from core.flags import printable_path


def out_dir(path: str | os.PathLike) -> Path:
    """``--out``, created if needed, or a one-line error naming it."""
    out = Path(printable_path("--out")(os.fspath(path)))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: not writable")
    return out


def png_bytes(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes (for an atomic write), the figure closed."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
