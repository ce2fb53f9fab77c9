#!/usr/bin/env bash
# Whisper tiny.en W8A8 on a GPU machine, calibrated on 100 LibriSpeech utterances
# against the FP32 transcripts, evaluated on the 18 transcribed clips:
#   python benchmarks/table1.py --task whisper --whisper-calib librispeech --device cuda --bits 8 \
#       --methods max esc mse percentile entropy
# (esc right after max, so a run cut short still has the ESC row).
#
# The audio + weights it needs are 95.5 MB, more than one device call can carry
# (64 MiB, the whisper model alone is 75.5 MB), so they go over in two calls on
# the same warm machine (it is kept 30 s after a call: make the second call at once):
#
#   here:    bash benchmarks/device_whisper.sh pack [SRC=../shared] [DATA=.esc_data] [STAGE=.esc_stage]
#            (copies the needed files to DATA, moves the first part of model.safetensors to
#             STAGE; add both to .git/info/exclude; prints the sizes)
#   call 1:  bash benchmarks/device_whisper.sh stage [STAGE]          carry: [STAGE, .whl]
#            (keeps the model part in /tmp/esc_stage; installs $ESC_WHEELS/*.whl (default .whl/)
#             into /tmp/site if present; `run` puts /tmp/site on PYTHONPATH)
#   call 2:  ESC_SHARED=$PWD/.esc_data bash benchmarks/device_whisper.sh run      carry: [DATA]
#            (re-joins the model, checks its sha256, runs the table)
#
# `run` reads the shared folder from $ESC_SHARED (default <repo>/shared); a complete
# model.safetensors there needs no staging. Results: $OUT/results.json, results.md,
# whisper_ls.tar.gz (every run's report.json, plots, quantized.pt, metrics.json;
# rewritten after each row) and log.txt (4 files: the device returns at most 8).
# Knobs (env): ESC_TIME_LIMIT (s, default 450: the python run is stopped then and the
# rows done so far are kept), ESC_METHODS, ESC_BUDGET (100), ESC_N_CALIB (100),
# ESC_BATCH (100: the whole calibration set in one encoder/decoder batch; greedy
# decoding is latency-bound on a GPU, so one batch halves its steps), ESC_THREADS (8),
# ESC_DEVICE (cuda), ESC_MODELOPT_CUDA_EXT=1 to JIT-build modelopt's CUDA fake-quant
# kernels (needs nvcc + ninja, 1-2 min; default 0: modelopt's pure-PyTorch path, the
# one the CPU results use), ESC_WORK (/tmp/esc_whisper_ls: the full --out folder).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL_REL=models/whisper-tiny.en
PART1=model.safetensors.part1
PART2=model.safetensors.part2
STAGE_TMP=/tmp/esc_stage

pack() {
    local src=${1:-$REPO/../shared} data=${2:-$REPO/.esc_data} stage=${3:-$REPO/.esc_stage}
    local part1_bytes=${ESC_PART1_BYTES:-41943040}  # 40 MiB in call 1, the rest with the audio in call 2
    [ -f "$src/$MODEL_REL/model.safetensors" ] || { echo "no $src/$MODEL_REL/model.safetensors: pass the shared folder" >&2; exit 2; }
    rm -rf "$data" "$stage"
    mkdir -p "$data/data/sb_samples/ASR" "$data/data/ljspeech/wavs" "$data/$MODEL_REL" "$stage"
    cp -r "$src/data/librispeech_speakers" "$data/data/"
    cp "$src"/data/sb_samples/ASR_train.json "$src"/data/sb_samples/ASR_dev.json "$data/data/sb_samples/"
    cp "$src"/data/sb_samples/ASR/*.wav "$data/data/sb_samples/ASR/"
    cp "$src/data/ljspeech/metadata.csv" "$data/data/ljspeech/"
    cp "$src"/data/ljspeech/wavs/LJ001-000[1-8].wav "$data/data/ljspeech/wavs/"
    for f in config.json generation_config.json preprocessor_config.json tokenizer.json; do
        cp "$src/$MODEL_REL/$f" "$data/$MODEL_REL/"
    done
    local model=$src/$MODEL_REL/model.safetensors
    (cd "$src/$MODEL_REL" && sha256sum model.safetensors) > "$data/$MODEL_REL/model.safetensors.sha256"
    head -c "$part1_bytes" "$model" > "$stage/$PART1"
    tail -c +"$((part1_bytes + 1))" "$model" > "$data/$MODEL_REL/$PART2"
    chmod -R u+w "$data" "$stage"
    echo "model.safetensors: $(stat -c %s "$model") bytes, split $(stat -c %s "$stage/$PART1") + $(stat -c %s "$data/$MODEL_REL/$PART2")"
    echo "call 1 carries $stage: $(du -sb "$stage" | cut -f1) bytes (+ the working tree, + .whl if used)"
    echo "call 2 carries $data: $(du -sb "$data" | cut -f1) bytes (+ the working tree)"
    echo "working tree (tracked + untracked, not ignored): $(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cat 2>/dev/null | wc -c) bytes"
    echo "add to .git/info/exclude: /$(basename "$data")/ and /$(basename "$stage")/"
}

stage() {
    local stage=${1:-$REPO/.esc_stage}
    [ -f "$stage/$PART1" ] || { echo "no $stage/$PART1: run 'pack' here and carry $(basename "$stage")" >&2; exit 2; }
    mkdir -p "$STAGE_TMP" && cp "$stage/$PART1" "$STAGE_TMP/"
    local wheels=${ESC_WHEELS:-$REPO/.whl}
    if compgen -G "$wheels/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
        echo "wheels of $wheels installed into /tmp/site"
    fi
    ls -l "$STAGE_TMP"
}

assemble_model() {  # join the two parts into $1/models/whisper-tiny.en/model.safetensors
    local mdir=$1/$MODEL_REL
    [ -f "$mdir/model.safetensors" ] && return 0
    [ -f "$mdir/$PART2" ] || { echo "no model in $mdir (neither model.safetensors nor $PART2)" >&2; exit 2; }
    [ -f "$STAGE_TMP/$PART1" ] || { echo "$STAGE_TMP/$PART1 missing: the machine was given back after 'stage'; run 'stage' again, then 'run' at once" >&2; exit 2; }
    cat "$STAGE_TMP/$PART1" "$mdir/$PART2" > "$mdir/model.safetensors.tmp"
    (cd "$mdir" && mv model.safetensors.tmp model.safetensors && sha256sum -c model.safetensors.sha256)
}

run() {
    local shared=${ESC_SHARED:-$REPO/shared}
    local out=${OUT:-$REPO/runs/device_whisper}
    local work=${ESC_WORK:-/tmp/esc_whisper_ls}
    local methods=${ESC_METHODS:-max esc mse percentile entropy}
    mkdir -p "$out"
    [ -d "$shared" ] || { echo "shared folder $shared not found: set ESC_SHARED" >&2; exit 2; }
    assemble_model "$shared"
    export ESC_SHARED=$shared PYTHONUNBUFFERED=1
    [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # modelopt imports pulp (16 MB wheel, an LP solver esc_plugin never calls) at import time.
    if ! python3 -c "import pulp" 2>/dev/null; then
        mkdir -p /tmp/esc_stubs/pulp
        printf '%s\n' '"""Stand-in for PuLP: modelopt imports it, esc_plugin never solves an LP."""' \
            'def __getattr__(name):' \
            '    if name.startswith("__"):' \
            '        raise AttributeError(name)' \
            '    return type(name, (), {})' > /tmp/esc_stubs/pulp/__init__.py
        export PYTHONPATH=/tmp/esc_stubs${PYTHONPATH:+:$PYTHONPATH}
        echo "pulp not installed: using the import stub in /tmp/esc_stubs"
    fi
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    rm -rf "$work"
    cd "$REPO"
    local t0=$SECONDS
    set +e
    timeout -s INT -k 20 "${ESC_TIME_LIMIT:-450}" python3 - "$work" "$out/whisper_ls.tar.gz" $methods <<'PY' 2>&1 | tee "$out/log.txt"
import os, sys, time
t0 = time.time()
import torch
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      f"{' ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}", flush=True)
if os.environ.get("ESC_MODELOPT_CUDA_EXT", "0") != "1":
    # get_cuda_ext() caches its result on the function: None -> modelopt's PyTorch fake quant.
    from modelopt.torch.quantization import extensions
    extensions.get_cuda_ext.extension = None
else:
    from modelopt.torch.quantization.extensions import get_cuda_ext
    t = time.time(); ok = get_cuda_ext() is not None
    print(f"modelopt CUDA extension built: {ok} ({time.time() - t:.0f} s)", flush=True)
sys.path.insert(0, "benchmarks")
import table1
import transformers, modelopt, cma
print(f"transformers {transformers.__version__}, modelopt {modelopt.__version__}, cma {cma.__version__}; "
      f"imports {time.time() - t0:.1f} s", flush=True)
work, archive, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
env = os.environ.get
sys.exit(table1.main(["--task", "whisper", "--whisper-calib", "librispeech", "--device", env("ESC_DEVICE", "cuda"),
                      "--bits", "8", "--methods", *methods, "--budget", env("ESC_BUDGET", "100"),
                      "--threads", env("ESC_THREADS", "8"), "--keep-going", "--progress",
                      "--task-arg", f"n_calib={env('ESC_N_CALIB', '100')}",
                      "--task-arg", f"batch_size={env('ESC_BATCH', '100')}",
                      "--out", work, "--archive", archive]))
PY
    local rc=${PIPESTATUS[0]}
    set -e
    for f in results.json results.md; do [ -f "$work/$f" ] && cp "$work/$f" "$out/"; done
    echo "exit $rc after $((SECONDS - t0)) s (124 = stopped by ESC_TIME_LIMIT; rows done so far are in $out)"
    return "$rc"
}

case ${1:-run} in
    pack) shift; pack "$@" ;;
    stage) shift; stage "$@" ;;
    run) run ;;
    *) echo "usage: $0 pack [SRC] [DATA] [STAGE] | stage [STAGE] | run" >&2; exit 2 ;;
esac
