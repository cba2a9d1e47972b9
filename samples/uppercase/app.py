"""The classic: words in, shouted words out.

    cd samples/uppercase && streamkit run app:app

``words`` is polled every second and publishes a word; ``uppercase`` turns it into
capitals; ``shout`` logs it. streamkit.yaml wires them through two destinations.
"""

from __future__ import annotations

import itertools
import logging

from streamkit import StreamApp

app = StreamApp("uppercase")
log = logging.getLogger("uppercase")

_words = itertools.cycle(["hello", "stream", "kit", "world"])


@app.producer
def words() -> str:
    return next(_words)


@app.processor
def uppercase(text: str) -> str:
    return text.upper()


@app.consumer
def shout(text: str) -> None:
    log.info("%s!", text)
