#!/usr/bin/env bash
# The prepared GPU run (issue 13, item 5): kernel tests, kernel and model benchmarks against
# torchvision, and a two-minute shapes training, in one call of at most 8 minutes on one H200.
# benchmarks/gpu_run.py does the work and says what each step records; this script only
# installs the carried pycocotools wheel where pycocotools is missing, then starts it.
#
#   bash benchmarks/gpu.sh --output-dir "$OUT"     # on the device machine
#   bash benchmarks/gpu.sh --dry-run               # here: the same steps on the CPU, tiny (a temp folder)
#
# Results (in --output-dir; default benchmarks/results/): gpu_cuda.json, gpu_cuda.md (all steps'
# tables), gpu_tests_cuda.json, gpu_kernels_cuda.json, gpu_training_cuda.json,
# gpu_inference_cuda.json, gpu_shapes_cuda.json, and the log gpu_cuda.log: 8 files, one folder,
# all of which a device call brings back.
#
# Before the call, once, in the repository root of the checkout that the device tool sends
# (.whl/ is in .gitignore, so it must be carried; pycocotools needs only numpy, which is there):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pycocotools==2.0.11
#
# The call (device tool `run`; the command stays well under 2,000 characters):
#
#   run(command="bash benchmarks/gpu.sh --output-dir $OUT --budget 450",
#       carry=[".whl"], timeout_s=480)
#
# --budget 450 s covers all steps (each has its own timeout inside it, and the shapes training
# takes what the others leave, up to two minutes of training); timeout_s 480 leaves half a
# minute over it for the wheel's install and the summary. Then read $OUT/gpu_cuda.md (the
# reply's output_tail ends with it) and call give_back unless rerunning at once.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

dry_run=0
for argument in "$@"; do
    [ "$argument" = "--dry-run" ] && dry_run=1
done

if [ "$dry_run" = 0 ] && ! "$PYTHON" -c "import pycocotools" 2>/dev/null; then
    if ls .whl/pycocotools-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/pycocotools-*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
            && echo "installed the carried wheel: $(ls .whl/pycocotools-*.whl)" \
            || echo "the carried pycocotools wheel did not install: the steps that need it will be skipped"
    else
        echo "pycocotools missing and no wheel in .whl/: the shapes training (e) will be skipped"
    fi
fi

exec "$PYTHON" benchmarks/gpu_run.py "$@"
