#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU check (issue 32). One call on a lent GPU machine, at most 5 min.
#
# The device machine is not ours: Python 3.12 with its own torch 2.11 / torchvision 0.26,
# timm, onnxruntime, numpy, pyyaml, tqdm, safetensors, matplotlib and pytest (the device
# tool's KINDS.md lists its packages), but no pydantic (nor annotated-types,
# typing-inspection, a typing-extensions as new as pydantic's), no torch-pruning, no
# Fashion-MNIST, and no registry. So this script does its own set-up, without make:
#   setup   the carried wheels (.whl/) installed with --no-index into a --target folder put
#           first on PYTHONPATH (only when pydantic or torch_pruning does not import);
#           tasprune from this tree with `pip install --no-deps --no-build-isolation -e .`,
#           or, where that fails (a read-only site-packages), PYTHONPATH=src; the JSON says
#           which ("install").
# Then each part under its own time limit, all inside GPU_CHECK_BUDGET seconds (290), going
# on past a part that fails or times out:
#   tests                 pytest -m cuda tests/test_cuda.py (device loader, bf16 AMP,
#                         channels-last, search and distillation steps, CUDA latency table,
#                         torch.compile, a 1-process NCCL group under torchrun)
#   bench_cifar_resnet56  bench/bench_search.py --device cuda, batch 256: plain step, search
#   bench_resnet18        iteration, ratio, peak CUDA memory; resnet18 at 3x224x224, batch 64
#   recipe                tasprune run fmnist-r20-quick on CUDA, the carried Fashion-MNIST as
#                         data.root; wall time per stage, top-1, FLOPs ratio, latency
#   suite                 with the time left (>= 20 s): the CPU suite (not slow, not cuda) on
#                         the machine's torch, to see what differs from the torch tested here
# It writes one JSON (GPU, driver, torch, each part's status, seconds and figures) to
# bench/results/gpu/<gpu>.json and, on the device machine, $OUT/gpu_check.json with each
# part's log beside it, and prints one summary line last.
#
# Here, once (downloads the wheels for CPython 3.12 manylinux x86-64 at the versions this
# checkout's .venv runs, copies Fashion-MNIST; idempotent; about 33 MiB in all):
#     make gpu-prep                      # = bash bench/gpu_check.sh --prep
# Then a session with a device lent makes ONE call of the device tool's `run`:
#     command:   bash bench/gpu_check.sh
#     carry:     [".whl", ".gl/data"]
#     timeout_s: 330                      (kind left out: nvidia-h100-x1)
# (prefix the command with GPU_CHECK_COMMIT=<sha of HEAD> to record the commit: .git does not
# travel), and, back here, copies the JSON into the tree and commits it:
#     cp <files_at>/gpu_check.json bench/results/gpu/<gpu>.json
# A run takes about 4-5 minutes, so 15 minutes of device time leave room for the start and one
# rerun; call give_back unless rerunning at once.
#
# Other modes, for this machine:
#     bash bench/gpu_check.sh --cpu          (or GPU_CHECK_DRY=1) every part on the CPU with
#                                            tiny sizes, no CUDA tests: checks the plumbing
#     bash bench/gpu_check.sh --setup-only   the set-up and an import check, nothing else
# PYTHON names the interpreter (default python3, the one that holds torch on the device).
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELS=.whl
DATA_ROOT=.gl/data
FMNIST_SRC=${FMNIST:-/usr/share/datasets/fashion-mnist}
FMNIST_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
# What the device machine lacks, by distribution name (pydantic-core pins typing-extensions
# >= 4.16, newer than the image may hold).
WHEEL_PACKAGES="pydantic pydantic-core annotated-types typing-inspection typing-extensions torch-pruning"
PLATFORMS="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"

MODE=gpu
case "${1:-}" in
  --prep) MODE=prep ;;
  --cpu) MODE=cpu ;;
  --setup-only) MODE=setup ;;
  "") [ "${GPU_CHECK_DRY:-0}" != 0 ] && MODE=cpu ;;
  *) echo "usage: bash bench/gpu_check.sh [--prep | --cpu | --setup-only]" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------------- prep (here)
prep() {
  local py=${PREP_PYTHON:-.venv/bin/python} pins name ver norm f
  # The versions this checkout's environment runs, so the device runs what was tested here.
  pins=$("$py" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $WHEEL_PACKAGES) || return 1
  mkdir -p "$WHEELS" "$DATA_ROOT/FashionMNIST/raw"
  for pin in $pins; do  # another version of one of them would stop the install there
    name=${pin%%==*}; ver=${pin##*==}; norm=$(echo "$name" | tr - _)
    for f in "$WHEELS/$norm"-*.whl; do
      [ -e "$f" ] || continue
      case "$f" in "$WHEELS/$norm-$ver-"*) ;; *) echo "removing $f"; rm -f "$f" ;; esac
    done
  done
  # shellcheck disable=SC2086
  "$py" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS --no-deps -d "$WHEELS" $pins || return 1
  for f in $FMNIST_FILES; do
    [ -r "$FMNIST_SRC/$f" ] || { echo "missing $FMNIST_SRC/$f: run make data" >&2; return 1; }
    cmp -s "$FMNIST_SRC/$f" "$DATA_ROOT/FashionMNIST/raw/$f" || cp "$FMNIST_SRC/$f" "$DATA_ROOT/FashionMNIST/raw/"
  done
  ls "$WHEELS"
  du -sh "$WHEELS" "$DATA_ROOT"
  echo "carry: [\"$WHEELS\", \"$DATA_ROOT\"]"
}

if [ "$MODE" = prep ]; then
  prep
  exit $?
fi

# ------------------------------------------------------------------------- set-up (there)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-290}
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=${OUT:-$WORK/logs}
mkdir -p "$LOGS"
SITE=$WORK/site
INSTALL=none
WHEELS_USED=none
export PYTHONUNBUFFERED=1 TASPRUNE_NO_PROGRESS=1 TASPRUNE_CACHE=$WORK/cache PIP_DISABLE_PIP_VERSION_CHECK=1
: >"$WORK/parts.tsv"

record() {  # name status rc seconds limit [command]
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >>"$WORK/parts.tsv"
  echo "== $1: $2 (rc $3, ${4}s$([ "$5" = - ] || echo " of ${5}s"))"
}

setup() {
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if ! "$PY" -c "import pydantic, torch_pruning" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      echo "no wheels in $WHEELS: run 'make gpu-prep' here and name $WHEELS in carry"
      return 1
    fi
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "$WHEELS"/*.whl || return 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    WHEELS_USED="$(cd "$WHEELS" && echo *.whl) -> --target $SITE on PYTHONPATH"
  fi
  if "$PY" -c "import sys, tasprune; sys.exit(not tasprune.__file__.startswith('$ROOT/src/'))" 2>/dev/null; then
    INSTALL=present
  elif timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-cache-dir -e .; then
    INSTALL="pip install --no-deps -e ."
  else
    echo "editable install failed: using PYTHONPATH=$ROOT/src"
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    INSTALL="PYTHONPATH=src"
  fi
  # Every import tasprune needs, each named when missing.
  "$PY" - <<'EOF'
import importlib, sys
need = ["torch", "torchvision", "numpy", "yaml", "pydantic", "tqdm", "matplotlib",
        "safetensors", "torch_pruning", "typing_extensions", "onnx", "onnxruntime", "pytest"]
missing = []
for name in need:
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as err:  # an import can fail with more than ImportError
        missing.append(f"{name} ({type(err).__name__}: {err})")
if missing:
    sys.exit("missing: " + "; ".join(missing))
import tasprune
print("tasprune", tasprune.__version__, tasprune.__file__)
EOF
}

echo "gpu_check: mode $MODE, budget ${BUDGET}s, logs in $LOGS"
t0=$(date +%s)
setup >"$LOGS/setup.log" 2>&1
rc=$?
cat "$LOGS/setup.log"
record setup "$([ $rc = 0 ] && echo ok || echo failed)" $rc $(($(date +%s) - t0)) -
if [ "$MODE" = setup ]; then
  echo "install: $INSTALL; wheels: $WHEELS_USED"
  exit $rc
fi

# ------------------------------------------------------------------------- parts
run_part() {  # name cap command...: run under min(cap, time left), log to $LOGS/name.log
  local name=$1 cap=$2 left limit rc status t
  shift 2
  left=$((DEADLINE - $(date +%s)))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    record "$name" skipped - 0 "$limit" "$*"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  t=$(date +%s)
  echo "$(date -u +%FT%TZ) start" >"$LOGS/$name.log"
  # SIGINT first, so pytest still writes its report; the whole process group goes.
  timeout -s INT -k 15 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  tail -n 4 "$LOGS/$name.log"
  record "$name" "$status" "$rc" $(($(date +%s) - t)) "$limit" "$*"
}

if [ "$MODE" = cpu ]; then
  export OMP_NUM_THREADS=1
  DEVICE=cpu
  TESTS=(-m cuda tests/test_cuda.py)  # all skip on the CPU
  BENCH=(--windows 1 --steps 1 --threads 1)
  R56=(--models cifar_resnet20 --batch-size 8)
  R18=(--models resnet18 --batch-size 2 --input-size 3 64 64)
  RECIPE=(--set data.train_subset=512 --set data.test_subset=256 --set teacher.train.epochs=1
    --set search.epochs=1 --set distill.train.epochs=1 --set report.latency_repeats=2)
  SUITE=(tests/test_shape.py)
else
  DEVICE=cuda
  TESTS=(-m cuda tests/test_cuda.py)
  BENCH=()
  R56=(--models cifar_resnet56 --batch-size 256)
  R18=(--models resnet18 --batch-size 64 --input-size 3 224 224)
  RECIPE=()
  SUITE=(-m "not slow and not cuda" tests)
fi

run_part tests 90 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/tests.xml" "${TESTS[@]}"
run_part bench_cifar_resnet56 35 "$PY" bench/bench_search.py --device "$DEVICE" "${BENCH[@]}" \
  "${R56[@]}" --out "$WORK/bench_cifar_resnet56.json"
run_part bench_resnet18 50 "$PY" bench/bench_search.py --device "$DEVICE" "${BENCH[@]}" \
  "${R18[@]}" --out "$WORK/bench_resnet18.json"
run_part recipe 100 "$PY" -m tasprune.cli run fmnist-r20-quick --out "$WORK/run" \
  --device "$DEVICE" --set "data.root=$ROOT/$DATA_ROOT" "${RECIPE[@]}"
# The CPU suite reads Fashion-MNIST where the Debian package puts it.
if [ "$MODE" = gpu ] && [ ! -e "$FMNIST_SRC" ] && mkdir -p "$FMNIST_SRC" 2>/dev/null; then
  cp "$DATA_ROOT"/FashionMNIST/raw/*.gz "$FMNIST_SRC"/
fi
XDIST=()
if [ "$MODE" = gpu ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
run_part suite 600 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/suite.xml" \
  "${XDIST[@]}" "${SUITE[@]}"

# ------------------------------------------------------------------------- the JSON
RESULTS=${GPU_CHECK_RESULTS:-$([ "$MODE" = gpu ] && echo "$ROOT/bench/results/gpu" || echo "$WORK")}
export MODE WORK LOGS RESULTS START BUDGET INSTALL WHEELS_USED ROOT
"$PY" - <<'EOF'
"""Gather the parts' outputs into one JSON and print the one summary line."""
import datetime
import json
import os
import platform
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

env = os.environ
work, logs, results = Path(env["WORK"]), Path(env["LOGS"]), Path(env["RESULTS"])
mode = env["MODE"]


def junit(path: Path, keep: int) -> dict:
    """Counts and (at most ``keep``) test cases of a pytest junit XML file."""
    if not path.is_file():
        return {"junit": "missing (interrupted before pytest wrote it)"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    cases, failures = [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):  # the test a timeout interrupted: pytest leaves it unnamed
            counts["interrupted"] = counts.get("interrupted", 0) + 1
            continue
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag, what in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = what, (node.get("message") or "").splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        counts[outcome] += 1
        row = {"test": name, "outcome": outcome, "seconds": float(case.get("time", 0))}
        if message:
            row["message"] = message
        cases.append(row)
        if outcome in ("failed", "errors"):
            failures.append(row)
    out = dict(counts)
    out["tests" if keep else "failures"] = cases if keep else failures[:40]
    return out


def bench(path: Path) -> dict:
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    keys = ("model", "batch", "input", "plain_step_ms", "search_iter_ms", "ratio",
            "plain_peak_mib", "search_peak_mib")
    rows = []
    for r in raw["rows"]:
        row = {k: r[k] for k in keys if k in r}
        for mode_ in ("plain", "search"):
            mem = r.get(f"{mode_}_memory", {})
            if "peak_reserved_mib" in mem:
                row[f"{mode_}_peak_reserved_mib"] = mem["peak_reserved_mib"]
        rows.append(row)
    return {"rows": rows, "amp": raw.get("amp"), "threads": raw.get("threads")}


def recipe(run: Path, log: Path) -> dict:
    """Wall time per stage (the pipeline's own 'stage X: finished in' lines), the training
    loops' seconds (history.jsonl), and the report's figures."""
    out: dict = {"stages": {}}
    text = log.read_text(errors="replace") if log.is_file() else ""
    for stage, secs in re.findall(r"stage (\w+): finished in ([\d.]+)s", text):
        out["stages"].setdefault(stage, {})["wall_s"] = float(secs)
    for stage, folder in (("teacher", "teacher"), ("search", "search"), ("distill", "student")):
        hist = run / folder / "history.jsonl"
        if hist.is_file():
            rows = [json.loads(x) for x in hist.read_text().splitlines() if x.strip()]
            entry = out["stages"].setdefault(stage, {})
            entry["epochs_done"] = len(rows)
            entry["loop_s"] = round(sum(r.get("seconds", 0.0) for r in rows), 2)
            if rows and "img_per_s" in rows[-1]:
                entry["img_per_s_last"] = round(rows[-1]["img_per_s"], 1)
    rep = run / "report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        for role in ("teacher", "pruned"):
            got = r.get(role, {})
            out[role] = {k: got.get(k) for k in ("top1", "flops", "params", "flops_ratio",
                                                 "latency_ms", "onnx_latency_ms") if k in got}
        out["latency_settings"] = r.get("latency")
        out["search"] = {k: r.get("search", {}).get(k) for k in ("shape_flops_ratio",
                                                               "pruned_in_band", "epochs")}
    return out


try:
    import torch

    torch_info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        torch_info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        import torchvision

        torch_info["torchvision"] = torchvision.__version__
    except Exception as err:
        torch_info["torchvision"] = f"not importable: {err}"
except Exception as err:
    torch_info, gpu = {"torch": f"not importable: {err}"}, None


def sh(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return None


result = {
    "check": "bench/gpu_check.sh",
    "mode": mode if mode == "gpu" else "cpu dry run (tiny sizes; not GPU figures)",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": gpu,
    "driver": sh(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
    **torch_info,
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    # The device gets a copy of the tree without .git: the caller may name the commit.
    "commit": env.get("GPU_CHECK_COMMIT") or sh(["git", "-C", env["ROOT"], "rev-parse", "HEAD"]),
    "install": env["INSTALL"],
    "wheels": env["WHEELS_USED"],
    "budget_s": int(env["BUDGET"]),
    "total_s": round(time.time() - int(env["START"])),
    "parts": {},
}
for line in (work / "parts.tsv").read_text().splitlines():
    name, status, rc, secs, limit, command = line.split("\t")
    part = {"status": status, "rc": rc, "seconds": int(secs), "limit_s": limit}
    if command:
        part["command"] = command
    if name == "tests":
        part.update(junit(work / "tests.xml", keep=1))
    elif name == "suite":
        part.update(junit(work / "suite.xml", keep=0))
    elif name.startswith("bench_"):
        part.update(bench(work / f"{name}.json"))
    elif name == "recipe":
        part.update(recipe(work / "run", logs / "recipe.log"))
    result["parts"][name] = part

slug = re.sub(r"[^a-z0-9]+", "-", (gpu or "cpu-dry-run").lower()).strip("-")
results.mkdir(parents=True, exist_ok=True)
target = results / f"{slug}.json"
text = json.dumps(result, indent=2) + "\n"
target.write_text(text)
if env.get("OUT"):
    (Path(env["OUT"]) / "gpu_check.json").write_text(text)


def brief(name: str, p: dict) -> str:
    s = f"{name} {p['status']} {p['seconds']}s"
    if "passed" in p:
        s += f" ({p['passed']} passed, {p['failed'] + p['errors']} failed, {p['skipped']} skipped"
        s += f", {p['interrupted']} interrupted)" if p.get("interrupted") else ")"
    for r in p.get("rows", []):
        mem = r.get("search_peak_mib")
        s += (f" ({r['model']} b{r['batch']}: {r['plain_step_ms']:.1f} / "
              f"{r['search_iter_ms']:.1f} ms = {r['ratio']:.2f}x"
              + (f", search peak {mem:.0f} MiB" if mem is not None else "") + ")")
    stages = p.get("stages")
    if stages:
        s += " (" + ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in stages.items()
                               if "wall_s" in v)
        if "pruned" in p:
            s += f"; top1 {p['teacher'].get('top1', 0):.2f} -> {p['pruned'].get('top1', 0):.2f}"
        s += ")"
    return s


parts = " | ".join(brief(k, v) for k, v in result["parts"].items())
print(f"gpu_check {result['mode'].split()[0]}: {gpu or 'no GPU'}, torch {torch_info.get('torch')}"
      f", {result['total_s']}s | {parts} | {target}")
EOF
