"""What a slide leaves on disk: the output layout and atomic writes (`layout`), the nuclei
table (`geoparquet`), the masks (`omezarr`), QuPath GeoJSON (`qupath`)."""
