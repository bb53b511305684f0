"""Ray Data pipelines, in groups:

- `sources/`: where images come from (COCO, YOLO, VOC, folders, archives, Parquet shards), as records,
  and their reading as a streaming Ray Dataset (`sources.reader`);
- `validation/`: decoding images safely, checking annotations, the errors table;
- `training/`: samples with the paper's augmentation, Ray Data datasets and batches for training;
- `inference/`: a model ready to predict (`Detector`), panoptic segmentation, drawing;
- `labelling/`: the batch labelling pipeline (`detr label`): read, prepare, model actors, exactly-once output;
- `tools/`: ingest to Parquet shards, format conversion, dataset digests;
- `storage` (any local path or object-store URI) and `placement` (where work runs) serve them all.
"""
