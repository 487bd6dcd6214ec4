"""From a yaml to a Composer Trainer: config, model resolution, parallelism and the memory estimate."""
