"""Batch labelling: a detector over any image source, written as a resumable Parquet dataset.

The pieces, one idea each, in the order the data flows:

- `prepare`: Ray tasks skip images already labelled, decode, hash and resize for the model,
  and order each window of images by shape;
- `predictor`: the model actor (`map_batches` with a callable class; the model loads once per actor);
  `panoptic_predictor` its `--task panoptic` form (segments and a panoptic PNG per image);
- `writer` and `output`: the driver commits rows in atomic chunks under OUT/labels and OUT/errors,
  each image exactly once (`key_digests` holds the keys already committed);
- `coco_export`, `panoptic_export`, `schema`, `segments`, `options`, `shapes`: the COCO results and
  COCO panoptic files, the table schemas, segments as row values, the job's settings, and grouping by size.

`jobs/label.py` puts them together as `detr label`.
"""
