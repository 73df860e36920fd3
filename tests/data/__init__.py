"""Tests of the input pipeline (``keras_pqcl.data``)."""
