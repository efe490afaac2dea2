"""Stage 3, generate: the `dwave generate` command and its preemptible job files, the engine
seam (a CPU engine and a CUDA engine that step many songs at once with cached layer inputs)
and the song files (WAV + spectrogram) they write."""
