"""The networks (TransUNet, DSBN, DenseCL, the denoising corruption) and their weights files."""
