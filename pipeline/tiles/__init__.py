"""The tile grid: plan the tiles of a slide (`plan`), decide which tile owns each nucleus
(`ownership`, with the spills into neighbouring cores) and stitch the tiles back (`stitch`)."""
