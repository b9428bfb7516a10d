#!/usr/bin/env bash
# The package as users get it: build the wheel and the sdist, install the wheel with only the
# core dependencies into a fresh virtualenv (no extras), and use it from another folder:
#   - `xmodal-eval --version` and `--cfg job experiment=shapes/retrieval` (configs inside the wheel);
#   - one tiny shapes evaluation with the CSV logger;
#   - logger=wandb and launcher=slurm without their extras stop with exit code 2 and the one-line
#     install hint.
# Used by .ci/run after `make test`. The core virtualenv is cached, keyed on the core dependency
# list (XMODAL_CI_CACHE, default ~/.cache/xmodal-ci); a cold run builds it from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "package: building wheel and sdist"
"$py" -m build --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  tail -30 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/xmodal-*.whl)
ls "$work"/dist/xmodal-*.tar.gz >/dev/null

key=$("$py" - <<'PY'
import hashlib, json, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(hashlib.sha256(json.dumps([deps, sys.version_info[:2]]).encode()).hexdigest()[:16])
PY
)
venv="${XMODAL_CI_CACHE:-$HOME/.cache/xmodal-ci}/core-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "package: building core virtualenv $venv (cold)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$wheel"
  touch "$venv/.complete"
else
  echo "package: reusing core virtualenv $venv"
  "$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
fi
for extra in wandb faiss transformers hydra_plugins.hydra_submitit_launcher; do
  if "$venv/bin/python" - "$extra" <<'PY'
import importlib.util, sys
try:
    found = importlib.util.find_spec(sys.argv[1]) is not None
except ModuleNotFoundError:  # its parent package is missing
    found = False
sys.exit(0 if found else 1)
PY
  then echo "package: $extra is installed in the core virtualenv; it must be an extra"; exit 1; fi
done

cd "$work"  # not the repository: only the installed package is visible
export XMODAL_OUTPUT="$work/outputs" XMODAL_DATA="$work/data" HF_HUB_OFFLINE=1 PYTHONPATH=
"$venv/bin/xmodal-eval" --version
"$venv/bin/xmodal-eval" --cfg job experiment=shapes/retrieval >/dev/null
"$venv/bin/xmodal-eval" experiment=shapes/retrieval_untrained data.shapes_world=small trainer=cpu \
  logger=csv
metrics=$(find "$XMODAL_OUTPUT/eval" -path '*/csv/metrics.csv' | head -n 1)
grep -q "test/t2i/R@1" "$metrics" || { echo "package: no metrics in the CSV log"; exit 1; }
# an option whose extra is not installed stops with exit code 2 and the one-line install hint
expect_install_hint() {
  local extra=$1 what=$2; shift 2
  set +e
  out=$("$venv/bin/xmodal-eval" "$@" 2>&1)
  rc=$?
  set -e
  if [ "$rc" -ne 2 ] || ! grep -qF "pip install 'xmodal[$extra]'" <<<"$out"; then
    echo "package: $what without the extra should exit 2 with the install hint (rc=$rc):"
    echo "$out" | tail -20
    exit 1
  fi
}
expect_install_hint wandb logger=wandb experiment=shapes/retrieval_untrained \
  data.shapes_world=small trainer=cpu logger=wandb force=true
expect_install_hint slurm launcher=slurm -m launcher=slurm experiment=shapes/retrieval_untrained
echo "package: ok ($(basename "$wheel"))"
