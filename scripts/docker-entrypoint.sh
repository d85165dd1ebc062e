#!/bin/sh
# The image's entry point: `ray ...` and `mlflow ...` run those tools (the Ray head and workers, the
# tracking server); anything else is an rsdet-compress command line.
set -e
case "${1:-}" in
    ray|mlflow|python|bash|sh) exec "$@" ;;
    *) exec rsdet-compress "$@" ;;
esac
