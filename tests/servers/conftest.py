"""The serving tests' shared fixtures: the real servers' interpreters."""

import pytest

from ailora_tools.servers import llama_cpp


@pytest.fixture(scope="module")
def python():
    """llama.cpp's interpreter; fails (does not skip) with the build recipe when there is none."""
    return llama_cpp.find_python()
