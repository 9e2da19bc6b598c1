"""Library code: slides, tissue, tiling, inference, post-processing, writers. No Prefect imports."""
