#!/usr/bin/env bash
# Install msjax on every worker of a TPU VM / pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE [--source DIR | --repo URL [--ref REF]] [options]

Install msjax on every worker: put the code in ~/DIR, create ~/DIR/.venv with PYTHON and
pip install -c constraints.txt -e '.[tpu]'. Safe to re-run (after a code change or on a fresh VM).

  --name NAME          TPU name                            (or env MSJAX_TPU_NAME)
  --zone ZONE          its zone                            (or env MSJAX_TPU_ZONE)
  --project PROJECT    GCP project (default: gcloud's)     (or env MSJAX_GCP_PROJECT)
  --source DIR         copy the git-tracked files of this local checkout, with their
                       uncommitted edits (default: the checkout holding this script)
  --repo URL           git clone URL instead of --source
  --ref REF            branch, tag or commit of --repo (default: its default branch)
  --dir DIR            install directory on the workers, relative to home (default: msjax)
  --python PYTHON      interpreter for the venv, installed with apt when missing
                       (default: python3.11; msjax needs Python >= 3.11)
  --dry-run            print the commands instead of running them
  -h, --help           this help
USAGE
}

SOURCE="" REPO="" REF="HEAD" DIR="msjax" PYTHON="python3.11"
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  common_option "$@"
  if ((SHIFT_N)); then
    shift "$SHIFT_N"
    continue
  fi
  case $1 in
    --source) SOURCE=$(need_value "$@"); shift 2 ;;
    --repo) REPO=$(need_value "$@"); shift 2 ;;
    --ref) REF=$(need_value "$@"); shift 2 ;;
    --dir) DIR=$(need_value "$@"); shift 2 ;;
    --python) PYTHON=$(need_value "$@"); shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

require_tpu
if [[ -n $SOURCE && -n $REPO ]]; then
  die "give --source or --repo, not both"
fi
if [[ -z $REPO ]]; then
  SOURCE=${SOURCE:-$(cd "$(dirname "$0")/.." && pwd)}
  if [[ ! -f $SOURCE/setup.py ]] || ! git -C "$SOURCE" rev-parse --git-dir >/dev/null 2>&1; then
    die "--source $SOURCE is not a git checkout of msjax (no setup.py or .git)"
  fi
fi

dir=$(shell_quote "$DIR")
py=$(shell_quote "$PYTHON")
install="if ! command -v $py >/dev/null 2>&1; then sudo apt-get update -qq; \
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $(shell_quote "$PYTHON-venv"); fi; \
cd $dir; if [ ! -x .venv/bin/python ]; then $py -m venv .venv; fi; \
.venv/bin/pip install -q --upgrade pip; \
.venv/bin/pip install -q -c constraints.txt -e \".[tpu]\"; \
.venv/bin/python -c \"import jax, msjax; print(jax.__version__)\""

if [[ -n $REPO ]]; then
  note "cloning $REPO ($REF) into ~/$DIR on every worker of $TPU_NAME"
  tpu_ssh all "set -euo pipefail; if [ ! -d $dir/.git ]; then git clone -q $(shell_quote "$REPO") $dir; fi; \
git -C $dir fetch -q origin $(shell_quote "$REF"); git -C $dir checkout -q --detach FETCH_HEAD; \
$install"
else
  note "copying $SOURCE (tracked files, with local edits) into ~/$DIR on every worker of $TPU_NAME"
  if ((DRY_RUN)); then
    archive=${TMPDIR:-/tmp}/msjax-src.tar.gz
    echo "git -C $(shell_quote "$SOURCE") ls-files -z | tar -C $(shell_quote "$SOURCE") --null -T - -czf $archive"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    archive=$tmp/msjax-src.tar.gz
    git -C "$SOURCE" ls-files -z | tar -C "$SOURCE" --null -T - -czf "$archive"
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:msjax-src.tar.gz" "${GCLOUD_SCOPE[@]}" \
    --worker=all
  tpu_ssh all "set -euo pipefail; mkdir -p $dir; tar -xzf msjax-src.tar.gz -C $dir; \
rm msjax-src.tar.gz; $install"
fi
