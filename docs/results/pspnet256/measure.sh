#!/bin/bash
# Issue 28 item 5: conditional export (parity) and latency of the trained gated PSPNet (run 2).
cd /work/main
M=~/bs_keras_runs/psp256/gated2/last.keras
# last.keras = epoch 4: what best.keras is under the candidates-after-the-L0-ramp rule (best.keras was epoch 1, gates open)
O=~/bs_keras_runs/psp256
set -x
.venv/bin/python -m export $M --out $O/export_tflite --overwrite --mode conditional --calibration fashion_canvas --calibration-samples 256 --format tflite --quantize none,float16,dynamic --parity-samples 64 > $O/export_tflite.txt 2>&1
.venv/bin/python -m export $M --out $O/export_sm --overwrite --mode conditional --calibration fashion_canvas --calibration-samples 256 --format saved_model --parity-samples 64 > $O/export_sm.txt 2>&1
.venv/bin/python -m export $M --out $O/export_sm_xla --overwrite --mode conditional --xla --calibration fashion_canvas --calibration-samples 256 --format saved_model --parity-samples 64 > $O/export_sm_xla.txt 2>&1
.venv/bin/python bench/latency.py --models trained --model-path $M --xla --variants dense,masked,compact,cond,narrow,narrow+g --calibration 16 > $O/latency.txt 2>&1
