"""The PNG reports people look at (loss curves, perplexity and QA tables), drawn by matplotlib
without a display: ``subplots`` for a figure, ``png`` for its bytes."""

from __future__ import annotations

import io


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the file-only backend -> (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def png(fig) -> bytes:
    """A figure as PNG bytes, laid out; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
