"""What every concern uses: ``distributed`` (process groups, ranks, the device), ``log`` (logging
on rank 0, progress bars) and ``visualize`` (palettes, colourised labels, panels, curves)."""
