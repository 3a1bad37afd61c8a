"""Where and how work runs: the device, the precision switch (compute), torchrun processes and stop signals."""
