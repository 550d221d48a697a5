"""The model under attribution: DDPM noise schedule, U-Net, training, sampling, measurements.

Knows nothing of attribution or benchmarks. Imports are lazy: importing ``diffusion`` builds
nothing and touches no device.
"""
