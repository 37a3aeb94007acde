"""Calibrate: a local causal LM and a text corpus → a calibration store (`dump`, parallel parts joined by
`merge`): each window's router inputs and per-unit sensitivities delta_nll."""
