#!/usr/bin/env bash
# The main job: set up, then watch the best source this host offers for a bounded time
# (DURATION seconds, default 60), then print the report. Extra arguments go to `dynvm-trace top`.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec dynvm-trace top --source auto --duration "${DURATION:-60}" "$@"
