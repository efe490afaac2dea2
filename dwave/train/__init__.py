"""Stage 2, train: windows from a store, the synchronous data-parallel training loop, its
schedule, baselines, watchdog and the listening samples it writes while it learns."""
