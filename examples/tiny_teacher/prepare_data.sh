#!/usr/bin/env bash
# Tiles the built-in `pretrain_tiny` recipe was trained on (the shipped `multiteach-tiny` teacher):
#   - ../shared/data/unlabeled_tiles_224 (614 tiles; per-source licences in its PROVENANCE.md)
#   - the two real slides in ../shared/data/wsi, re-tiled at other offsets (50 % overlap) and at two
#     magnifications (CMU-1-Small-Region: CC0; TCGA-CR-7395-01A-01-TS1: TCGA open access).
# Usage: examples/tiny_teacher/prepare_data.sh SHARED_DATA OUT
set -euo pipefail
shared=${1:?usage: prepare_data.sh SHARED_DATA OUT}
out=${2:?usage: prepare_data.sh SHARED_DATA OUT}
mt=${MULTITEACH:-multiteach}
for mpp in 0.5 1.0; do
  "$mt" tile "$shared/wsi/CMU-1-Small-Region.svs" --out "$out/wsi_mpp$mpp" --mpp-target "$mpp" --overlap 0.5
  # the TCGA frozen section records no mpp; 0.5 µm/px at level 0 is assumed (its PROVENANCE.md: ~1-2 µm/px by eye)
  "$mt" tile "$shared/wsi/TCGA-CR-7395-01A-01-TS1.svs" --out "$out/wsi_mpp$mpp" --mpp-target "$mpp" --overlap 0.5 --mpp 0.5
done
