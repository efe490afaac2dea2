"""Stage 1, preprocess: songs from anywhere (files, archives, URLs, S3) become mu-law codes in a
store (local or S3), with the Dask cluster that does it. Reads nothing of the model's."""
