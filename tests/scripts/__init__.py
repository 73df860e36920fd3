"""Scripts the tests run in subprocesses (``python tests/scripts/<name>.py``), and the tiny
setup they share with the test modules (imported there as ``tests.scripts.tiny_setup``)."""
