#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run, on a machine with a CUDA device:
#
#   benchmarks/gpu_figures.sh [RESULTS_DIR]     # default: gpu-results
#
# In order of importance, each under its own time limit so that one slow benchmark cannot
# take the others' time (about 10 minutes in all): the engine against its ceilings (336
# files, as many as the reference measurement but not its sizes: the corpus images at
# their own size and seven JPEG re-encodings of each; batch 64, 16 intake threads; 280 s),
# the opt-in fast decoding paths (draft JPEG decoding, nvJPEG; 140 s) and reduced
# precision (140 s). Each benchmark's output goes to the terminal and to
# RESULTS_DIR/<name>.log, and its figures, where it writes them, to RESULTS_DIR/<name>.json.
#
# Environment: PYTHON (default python3), IMAGES (default: the corpus beside the checkout),
# THREADS (default 16). Relative paths are taken from where the script is called.
set -uo pipefail

here() {  # an absolute path for a path given relative to the caller's directory
    realpath -m -s -- "$1"
}
results=$(here "${1:-gpu-results}")
python=${PYTHON:-python3}
[[ $python == */* ]] && python=$(here "$python")
images=${IMAGES:+$(here "$IMAGES")}
cd "$(dirname "$0")/.." || exit 2
images=${images:-$(here ../shared/corpus/images)}
threads=${THREADS:-16}
mkdir -p "$results" || exit 2

if [ ! -d "$images" ]; then
    echo "no images at $images: set IMAGES to a folder of JPEG and PNG files" >&2
    exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "$python sees no CUDA device (or has no torch): these figures need one" >&2
    exit 2
fi
"$python" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)' \
    | tee "$results/device.log"

failed=0
measure() {  # NAME SECONDS SCRIPT ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    # SIGINT first, so that a benchmark cut off removes its temporary files; then SIGKILL.
    PYTHONUNBUFFERED=1 timeout -s INT -k 15 "$limit" "$python" "$@" 2>&1 |
        tee "$results/$name.log"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "== $name ended with status $status (124: it ran past $limit s)"
        failed=1
    fi
}

measure engine 280 benchmarks/bench_engine.py --device cuda --images "$images" \
    --batch-size 64 --threads "$threads" --copies 7 --limit-heavy 336 --standin-repeat 3
measure fast_decode 140 benchmarks/bench_fast_decode.py --device cuda --images "$images" \
    --batch-size 64 --threads "$threads" --json "$results/fast_decode.json"
measure autocast 140 benchmarks/bench_autocast.py --device cuda --images "$images" \
    --batch-size 64 --threads "$threads" --json "$results/autocast.json"
exit "$failed"
