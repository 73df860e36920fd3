"""The test suite, a package so that test modules import their shared code as ``tests.helpers``
and ``tests.scripts.tiny_setup`` whatever folder pytest is started from."""
