"""What the tests and the benchmarks share (as transformers.testing_utils): synthetic checkpoints and matrices
(`synthetic`), peak-memory probes run as subprocesses (`python -m ailora_tools.testing.memprobe`,
`calibration_memprobe`, `inits_memprobe`; `held`: what code holds, counted), the whole-model LoRA-DA reference the
layer-wise calibration is checked and timed against (`calibration_reference`), and PEFT's own CorDA and LoRA-GA init
(`peft_data_inits`). Not used by the tool itself."""
