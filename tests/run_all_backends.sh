#!/usr/bin/env bash
# Run the whole test suite once per Keras backend (TensorFlow, JAX, PyTorch).
# Usage: bash tests/run_all_backends.sh [extra pytest args]
# Tests run in KERAS_PQCL_TEST_WORKERS parallel processes (pytest-xdist, default 2: most tests
# are single-threaded Python and compilation); a file's tests stay in one process, so module
# fixtures are built once.
set -u
cd "$(dirname "$0")/.."
workers=${KERAS_PQCL_TEST_WORKERS:-2}
status=0
for backend in tensorflow jax torch; do
    echo "=== KERAS_BACKEND=$backend"
    KERAS_BACKEND=$backend python -m pytest tests -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
    rc=$?
    # pytest exits 5 when it collects nothing: that is a failure of the suite here.
    if [ $rc -ne 0 ]; then echo "=== $backend: FAILED (exit $rc)"; status=1; fi
done
[ $status -eq 0 ] && echo "=== all backends passed"
exit $status
