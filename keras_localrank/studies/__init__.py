"""Studies: runnable experiments built on the library, one shape each.

Every study is a frozen config dataclass plus `train_and_evaluate(config,
workdir)`, which writes everything into one run directory
(`keras_localrank.rundir.RunDirectory`: a lock, the config check before any
write, atomic outputs, a manifest and resume). The absl scripts in
`experiments/` only turn flags into a config and call it.

- `keras_localrank.studies.dynamics`: local rank over training of an MLP
  (`DynamicsConfig`, one sub-run per seed).
- `keras_localrank.studies.information_study`: the information hooks of the
  dynamics study (`I(X;T)`, `I(T;Y)` at the local-rank steps, information
  planes, the compression report).
- `keras_localrank.studies.vib_sweep`: the VIB trade-off sweep
  (`SweepConfig`, one sub-run per (beta, seed)).

Submodules are imported on use: `import keras_localrank.studies` is cheap.
"""

__all__ = ["dynamics", "information_study", "vib_sweep"]
