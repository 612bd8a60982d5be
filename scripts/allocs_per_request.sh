#!/bin/bash
# Server heap allocations per request (calls to jemalloc's malloc): scripts/calls_per_request.sh malloc.
#
#   bash scripts/allocs_per_request.sh .build/release/stockade 7431 -P 16 -n 200000 PING
#   bash scripts/allocs_per_request.sh .build/release/stockade 7432 -P 1 -n 50000 -r 100000000 RESERVE user:__rand_int__ rb 1
exec bash "$(dirname "$0")/calls_per_request.sh" malloc "$@"
