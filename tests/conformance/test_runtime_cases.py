"""Run the packaged runtime conformance cases as part of ``pytest tests``."""

from streamkit.conformance.test_runtime import *  # noqa: F403
