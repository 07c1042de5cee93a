"""What the tests and the benchmarks share (as transformers.testing_utils): synthetic checkpoints and matrices
(`synthetic`), peak-memory probes run as subprocesses (`python -m ailora_tools.testing.memprobe`,
`calibration_memprobe`), and the whole-model LoRA-DA reference the layer-wise calibration is checked and timed against
(`calibration_reference`). Not used by the tool itself."""
