"""Run the packaged core conformance cases as part of ``pytest tests``.

The cases live in :mod:`streamkit.conformance.test_core` so that third-party binders
can run them with ``pytest --pyargs streamkit.conformance``; importing them here
makes pytest collect them once, under tests/.
"""

from streamkit.conformance.test_core import *  # noqa: F403
